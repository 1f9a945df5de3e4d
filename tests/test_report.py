"""The report end to end: tiny config -> runs -> records -> report.html / report.md / CSVs, on a
store that also holds a failed, a corrupt and a half-written run; figures; no torch on the way."""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from typer.testing import CliRunner

from attndrift.analysis import load_store
from attndrift.models.clip import TINY_CLIP_DIR
from attndrift.report import FIGURES, build_report
from attndrift.report.figures import NoData
from attndrift.report.overlay import AttentionSample, attention_overlay
from conftest import ROOT, tiny_config
from test_tables import fake_record, matched_store, write_store

ALWAYS = {
    "baseline_structure",
    "layer_delta_heatmaps",
    "lr_panels",
    "trajectories",
    "structure_vs_zeroshot",
    "training_dynamics",
    "metric_correlations",
    "convergence",
    "dashboard",
    "accuracy_entropy",
    "layer_time_heatmap",
    "gini_evolution",
    "erf_evolution",
    "zeroshot_per_model",
}
# Figures that need runs the small stores here do not have (layer freezing, two LoRA target
# sets): they must say so instead of drawing.
NEEDS_MORE = {"frozen_layers": "froze layers", "lora_targets": "LoRA target modules",
              "interpolation": "interpolation.json"}


def _add_broken_runs(store: Path) -> None:
    (store / "corrupt").mkdir()
    (store / "corrupt" / "record.json").write_text('{"schema_version": 1, "status": "comp')
    (store / "half").mkdir()
    (store / "half" / ".record.json.ab12cd.tmp").write_text('{"schema_')


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, request) -> Path:
    """The session's tiny full-FT and LoRA runs, one more full-FT run at a higher learning rate,
    a run that failed for real, a corrupt record and a half-written one."""
    if not (TINY_CLIP_DIR / "model.safetensors").is_file():
        pytest.skip(f"the shipped tiny CLIP is not built yet ({TINY_CLIP_DIR})")
    from attndrift.train import run

    store = tmp_path_factory.mktemp("real_store")
    shutil.copytree(request.getfixturevalue("full_ft_run"), store / "full_ft")
    shutil.copytree(request.getfixturevalue("lora_run"), store / "lora")
    run(
        tiny_config("tiny_full_ft", "train.lr=3e-3", "name=full_ft_hi"),
        store / "full_ft_hi",
        progress=False,
    )
    with pytest.raises(KeyError):
        # validation refuses unknown task names; a config edited after validation fails late
        cfg = tiny_config("tiny_full_ft", "name=broken")
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"zeroshot": ["no-such-task"]})})
        run(cfg, store / "failed", progress=False)
    _add_broken_runs(store)
    return store


@pytest.fixture(scope="module")
def real_report(real_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report(real_store, out), out


def test_end_to_end_report_from_real_runs(real_report):
    result, out = real_report
    assert result.counts == {"completed": 3, "failed": 1, "corrupt": 1, "missing": 1}
    assert ALWAYS | {"attention_overlay"} <= set(result.figures)
    html = (out / "report.html").read_text()
    # self-contained: every drawn figure embedded, nothing fetched from elsewhere
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', html)) == len(
        result.figures
    )
    assert not re.search(r'(src|href)="(https?:)?//', html)
    for status in ("failed", "corrupt", "missing"):
        assert f'class="status-{status}"' in html
    assert "KeyError" in html and "half-written" in html
    md = (out / "report.md").read_text()
    for name in result.figures:
        assert f"](figures/{name}.png)" in md and (out / "figures" / f"{name}.png").stat().st_size
    csvs = sorted((out / "tables").glob("*.csv"))
    assert {p.stem for p in csvs} == set(result.tables)
    assert {
        "runs",
        "main_comparison",
        "zeroshot",
        "lr_sweep",
        "per_layer_delta",
        "collapse_onset",
        "provenance",
    } <= set(result.tables)
    for path in csvs:
        with open(path) as fh:
            rows = list(csv.reader(fh))
        assert len(rows) >= 2 and all(len(r) == len(rows[0]) for r in rows), path.name


def test_report_command(tmp_path):
    from attndrift.cli import app

    store = write_store(
        tmp_path / "store", {"a": fake_record(status="failed"), "b": fake_record(status="diverged")}
    )
    _add_broken_runs(store)
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(store), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "r" / "report.html") in res.output
    for count in ("1 corrupt", "1 diverged", "1 failed", "1 missing"):
        assert count in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "not a directory" in res.output


def _fake_attention(run_dir: Path, n_patches: int = 16, drift: float = 0.5) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    pre = rng.dirichlet(np.ones(n_patches), size=(8, 4, 4)).astype(np.float32)
    fin = ((1 - drift) * pre + drift * np.eye(n_patches, dtype=np.float32)[0]).astype(np.float32)
    save_file(
        {
            "pretrained": pre,
            "final": fin,
            "labels": np.arange(8, dtype=np.int64),
            "images": rng.integers(0, 255, (8, 3, 32, 32), dtype=np.uint8),
        },
        str(run_dir / "attention.safetensors"),
    )


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory) -> Path:
    store = matched_store(tmp_path_factory.mktemp("fake_store"))
    _fake_attention(store / "full_ft_0.01_0")
    _fake_attention(store / "lora_0.01_0", drift=0.1)
    return store


def test_report_runs_without_torch(fake_store, tmp_path):
    code = (
        "import sys; from attndrift.report import build_report; import attndrift.stats; "
        f"r = build_report({str(fake_store)!r}, {str(tmp_path)!r}); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'peft')); "
        "assert not bad, bad; print(len(r.figures), sorted(r.counts.items()))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # every figure, the attention overlay included, but those the store has no runs for
    assert proc.stdout.split()[0] == str(len(FIGURES) - len(NEEDS_MORE))
    assert "('failed', 1)" in proc.stdout and "('corrupt', 1)" in proc.stdout
    assert (tmp_path / "tables" / "regularization.csv").is_file()


@pytest.mark.parametrize("spec", FIGURES, ids=[f.name for f in FIGURES])
def test_each_figure_draws_or_says_why(spec, fake_store):
    if spec.name in NEEDS_MORE:
        with pytest.raises(NoData, match=NEEDS_MORE[spec.name]):
            spec.draw(load_store(fake_store))
        return
    fig = spec.draw(load_store(fake_store))
    assert isinstance(fig, Figure) and fig.axes
    with pytest.raises(NoData):
        spec.draw([])  # an empty store: a reason, not a crash


def test_attention_overlay_layout():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (8, 3, 32, 32), dtype=np.uint8)
    maps = rng.dirichlet(np.ones(49), size=(8, 2, 3)).astype(np.float32)  # 7x7 patches
    samples = [AttentionSample(f"run {i}", images, maps, maps[:, ::-1]) for i in range(2)]
    fig = attention_overlay(samples, max_images=3)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3 * 4  # image, pretrained, two adapted
    assert len(fig.axes) - len(panels) == 3  # a colour bar per row (one scale per row)
    assert "layer 2 of 2" in fig.get_suptitle()
    with pytest.raises(NoData, match="square"):
        odd = rng.dirichlet(np.ones(50), size=(8, 2, 3)).astype(np.float32)
        attention_overlay([AttentionSample("x", images, odd, odd)])
    with pytest.raises(NoData):
        attention_overlay([])


def test_empty_store_report(tmp_path):
    (tmp_path / "empty").mkdir()
    result = build_report(tmp_path / "empty", tmp_path / "r")
    assert result.counts == {} and result.figures == [] and result.tables == ["runs"]
    html = result.html.read_text()
    assert "Not shown" in html and "no completed runs" in html


def test_repeated_provenance_rows_fold_into_one_line():
    from attndrift.analysis import Column, Table, table_specs
    from attndrift.report.render import table_ctx

    rows = [{"run": f"r{i}", "status": "completed", "platform": "Linux-x86_64"} for i in range(5)]
    rows.append({"run": "gpu", "status": "completed", "platform": "Linux-aarch64"})
    cols = (Column("run", "run"), Column("status", "status"), Column("platform", "platform"))
    fold = next(s.fold for s in table_specs() if s.name == "provenance")
    ctx = table_ctx(Table("provenance", "Provenance per run", "", cols, rows), fold)
    cells = [r for _, r in ctx["rows"]]
    assert cells == [
        ["5 runs (r0, r1, r2, … 2 more)", "completed", "Linux-x86_64"],
        ["gpu", "completed", "Linux-aarch64"],
    ]
