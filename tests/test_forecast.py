"""The forecast from the first epoch (attndrift.forecast): isotonic fits against closed forms
and an independent pool-adjacent-violators, leave-one-setting-out choice, too-small stores,
held-out targets and the CLI command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.test_predictors import _store
from typer.testing import CliRunner

from attndrift.analysis.forecast import (
    EPOCH1,
    calibrate,
    fit_isotonic,
    forecast,
    forecast_table,
    loso_errors,
)
from attndrift.analysis.predictors import samples
from attndrift.analysis.runs import Run
from attndrift.cli import app
from attndrift.records import SCHEMA_VERSION


def _pava(y: list[float], w: list[float]) -> list[float]:
    """Textbook pool-adjacent-violators (increasing), written independently of scipy."""
    blocks = [[v, wt, 1] for v, wt in zip(y, w, strict=True)]
    i = 0
    while i < len(blocks) - 1:
        if blocks[i][0] > blocks[i + 1][0]:
            a, b = blocks[i], blocks[i + 1]
            blocks[i] = [(a[0] * a[1] + b[0] * b[1]) / (a[1] + b[1]), a[1] + b[1], a[2] + b[2]]
            del blocks[i + 1]
            i = max(i - 1, 0)
        else:
            i += 1
    return [v for v, _, k in blocks for _ in range(k)]


def test_isotonic_fit_closed_forms_and_ties():
    xs, fit = fit_isotonic(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4]), True)
    assert fit.tolist() == pytest.approx([1, 2.5, 2.5, 4])
    # tied x are pooled first: x=1 has mean 1 (2 runs), x=2 has 0 -> one block 2/3
    xs, fit = fit_isotonic(np.array([1.0, 1, 2]), np.array([0.0, 2, 0]), True)
    assert xs.tolist() == [1, 2] and fit.tolist() == pytest.approx([2 / 3, 2 / 3])
    _, fit = fit_isotonic(np.array([1.0, 2, 3]), np.array([1.0, 3, 2]), False)
    assert fit.tolist() == pytest.approx([2, 2, 2])  # decreasing: 1 < 3 pooled to 2, then 2
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 8, 30).astype(float), rng.normal(size=30)
    xs, fit = fit_isotonic(x, y, True)
    counts = [float((x == v).sum()) for v in xs]
    means = [float(y[x == v].mean()) for v in xs]
    assert fit.tolist() == pytest.approx(_pava(means, counts))


def test_leave_one_setting_out_choice_matches_an_explicit_loop():
    runs, _ = _store()
    sample = next(s for s in samples(runs) if s.model == "tiny")
    x = sample.signal("cka_mean", EPOCH1)
    errs = loso_errors(x, sample.y, sample.cells)
    for cell in np.unique(sample.cells):
        train = np.isfinite(x) & (sample.cells != cell)
        xs = np.unique(x[train])
        means = [sample.y[train][x[train] == v].mean() for v in xs]
        fit = _pava(means, [float((x[train] == v).sum()) for v in xs])  # ρ > 0: increasing
        held = np.isfinite(x) & (sample.cells == cell)
        want = np.abs(np.interp(x[held], xs, fit) - sample.y[held])
        assert errs[held] == pytest.approx(want)
    cal = next(c for c in calibrate(runs) if c.model == "tiny")
    assert cal.too_small is None and cal.n_settings == 8 and cal.n_runs == 24
    assert cal.signal == "cka_mean"  # the only early signal related to retention here
    assert cal.error == pytest.approx(np.nanmean(errs))
    assert cal.error == min(cal.scores.values())
    table = forecast_table(runs)
    chosen = [r for r in table.rows if r["note"] == "chosen"]
    assert len(chosen) == 2 and {r["signal"] for r in chosen} == {"CKA to pretrained (mean)"}


def test_too_small_store_is_said_plainly():
    runs, _ = _store()
    few = [r for r in runs if r.config["model"] == "tiny"
           and r.config["data"]["dataset"] == "shapes-objects" and r.config["method"] == "lora"]
    (cal,) = calibrate(few)
    assert cal.knots is None and cal.too_small.startswith("too small to calibrate: 6 finished "
                                                          "runs in 2 settings")
    rows = forecast(few, few[:1])
    assert rows[0]["note"].startswith("too small to calibrate")


def test_a_target_in_the_store_is_forecast_without_its_setting():
    runs, _ = _store()
    target = runs[0]  # tiny, seed 0: has cka after epoch 1
    (row,) = forecast(runs, [target])
    assert row["held_out"] and row["signal"] == "cka_mean"
    rest = [r for r in runs if r.config["model"] == "tiny" and r.config["data"] ==
            target.config["data"] and r.config["method"] == target.config["method"]
            and r.config["train"] == target.config["train"]]
    pool = [r for r in runs if r not in rest]
    cal = next(c for c in calibrate(pool) if c.model == "tiny")
    value = 0.5 + (target.record["history"]["probes"][0]["aux"]["cka_cls"][0] - 0.5)
    assert row["value"] == pytest.approx(value)
    assert row["prediction"] == pytest.approx(np.interp(value, *cal.knots))
    assert row["actual"] == target.record["zeroshot"]["shapes-zs-shape"]["retention_pct"]


def _write(run: Run, path: Path) -> None:
    path.mkdir(parents=True)
    rec = {"schema_version": SCHEMA_VERSION, "run_id": path.name, "provenance": {},
           "timing": {}, **run.record}
    (path / "record.json").write_text(json.dumps(rec))


def test_cli_forecast(tmp_path):
    runs, _ = _store()
    tiny = [r for r in runs if r.config["model"] == "tiny"]
    for i, r in enumerate(tiny[1:]):
        _write(r, tmp_path / "store" / f"r{i}")
    _write(tiny[0], tmp_path / "new")
    result = CliRunner().invoke(app, ["forecast", "--store", str(tmp_path / "store"),
                                      str(tmp_path / "new")])
    assert result.exit_code == 0, result.output
    line = result.output.strip()
    assert line.startswith(f"{tmp_path / 'new'} → shapes-zs-shape: final retention ")
    assert "leave-one-setting-out" in line and "CKA to pretrained (mean)" in line
    missing = CliRunner().invoke(app, ["forecast", "--store", str(tmp_path / "nope"),
                                       str(tmp_path / "new")])
    assert missing.exit_code == 2 and "no run store" in missing.output
