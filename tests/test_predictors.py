"""The predictor ranking (attndrift.analysis.predictors) on records with known relations between
signals and retention, checked against scipy / numpy computed independently here."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from attndrift.analysis.predictors import (
    bootstrap_abs_rho,
    draw_cells,
    predictor_rows,
    predictors,
    reading_early_at,
    samples,
    weighted_spearman,
)
from attndrift.analysis.runs import Run

MODELS = ("tiny", "openai/clip-vit-base-patch32")
DATASETS = ("shapes-objects", "shapes-layout")
METHODS = ("full_ft", "lora")
LRS = (1e-3, 2e-3)
SEEDS = (0, 1, 2)
TASK = "shapes-zs-shape"


def _probe(step: int, epoch: float, fraction: float, entropy: float, cka: float | None,
           drift: float) -> dict:
    aux = {"embedding_drift": drift}
    if cka is not None:
        aux["cka_cls"] = [cka, cka]
    return {"step": step, "epoch": epoch, "fraction": fraction, "aux": aux,
            "metrics": {"mean": {"entropy": entropy, "erf": 0.5, "gini": 0.5,
                                 "head_diversity": 0.5},
                        "entropy": {"layers": [2.0, entropy]}}}


def _record(model, dataset, method, lr, seed, y, signals) -> dict:
    cka_end, cka_early, drift_end, drift_early, h_end, h_early = signals
    config = {"name": "r", "model": model, "method": method, "seed": seed,
              "data": {"dataset": dataset, "zeroshot": [TASK]}, "train": {"lr": lr},
              "lora": {"r": 8}}
    return {"status": "completed", "config": config,
            "baseline": {"mean": {"entropy": 2.0, "erf": 0.5, "gini": 0.5,
                                  "head_diversity": 0.5},
                         "entropy": {"layers": [2.0, 2.0]}},
            "history": {"probes": [_probe(10, 1.0, 0.25, h_early, cka_early, drift_early),
                                   _probe(40, 4.0, 1.0, h_end, None, drift_end)],
                        "loss": [], "epochs": []},
            "final": {"aux": {"cka_cls": [cka_end, cka_end], "embedding_drift": drift_end},
                      "test_acc": 0.9},
            "zeroshot": {TASK: {"retention_pct": y}}}


def _store():
    """Two backbones with opposite relations (pooling them would hide both), two datasets,
    full FT / LoRA at two lrs, three seeds; expected signal arrays kept for the checks."""
    rng = np.random.default_rng(5)
    runs, want = [], {}
    for model in MODELS:
        sign = 1.0 if model == "tiny" else -1.0
        for dataset, method, lr, seed in itertools.product(DATASETS, METHODS, LRS, SEEDS):
            y = float(rng.uniform(20, 100))
            cka_end = 0.5 + sign * math.floor(y / 10) / 200  # monotone, with ties
            cka_early = None if seed == 2 else 0.5 + sign * (y + rng.normal(0, 15)) / 200
            drift_end = 1.0 - y / 100 + rng.normal(0, 0.05)
            drift_early = float(rng.uniform(0, 1))  # unrelated
            h_end, h_early = 2.0 * (1 - 0.002 * (100 - y)), 2.0
            rec = _record(model, dataset, method, lr, seed, y,
                          (cka_end, cka_early, drift_end, drift_early, h_end, h_early))
            runs.append(Run(Path(f"/s/{model}/{dataset}/{method}/{lr}/{seed}"), "r", "completed",
                            None, rec))
            w = want.setdefault(model, {k: [] for k in (
                "y", "cka_end", "cka_early", "drift_end", "drift_early", "h_end", "cell",
                "dataset", "dm")})
            for k, v in (("y", y), ("cka_end", cka_end),
                         ("cka_early", math.nan if cka_early is None else cka_early),
                         ("drift_end", drift_end), ("drift_early", drift_early),
                         ("h_end", 100 * (h_end - 2) / 2), ("cell", (dataset, method, lr)),
                         ("dataset", dataset), ("dm", (dataset, method))):
                w[k].append(v)
    return runs, want


def _row(rows, model, when, name):
    return next(r for r in rows if r["model"] == model and r["when"] == when
                and r["name"] == name)


def _scipy(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    return stats.spearmanr(x[keep], y[keep]), int(keep.sum())


def test_rho_settings_means_and_within_group_means_match_scipy():
    runs, want = _store()
    rows = predictor_rows(runs, fraction=0.25, n_boot=200)
    for model, short in zip(MODELS, ("tiny", "ViT-B/32"), strict=True):
        w = want[model]
        for when, name, key in (("end", "cka_mean", "cka_end"), ("epoch 1", "cka_mean",
                                "cka_early"), ("end", "embedding_drift", "drift_end"),
                                ("epoch 1", "embedding_drift", "drift_early"),
                                ("25% of training", "cka_mean", "cka_early"),
                                ("end", "d_entropy", "h_end")):
            row = _row(rows, short, when, name)
            res, n = _scipy(w[key], w["y"])
            assert row["n"] == n == (16 if key == "cka_early" else 24)  # seed 2 lacks it early
            assert row["rho"] == pytest.approx(res.statistic, abs=1e-12)
            assert row["p"] == pytest.approx(res.pvalue, rel=1e-9)
            # setting means: one point per (dataset, method, lr), over the seeds with values
            x, y = np.asarray(w[key], float), np.asarray(w["y"], float)
            cells = sorted(set(w["cell"]))
            mx = [np.nanmean([a for a, c in zip(x, w["cell"], strict=True) if c == k])
                  for k in cells]
            my = [np.mean([b for a, b, c in zip(x, y, w["cell"], strict=True)
                           if c == k and math.isfinite(a)]) for k in cells]
            assert row["rho_settings"] == pytest.approx(stats.spearmanr(mx, my).statistic,
                                                        abs=1e-12)
            for col, by in (("within_dataset", "dataset"), ("within_dataset_method", "dm")):
                groups = sorted(set(w[by]))
                rhos = [abs(_scipy([a for a, g in zip(x, w[by], strict=True) if g == k],
                                   [b for b, g in zip(y, w[by], strict=True) if g == k]
                                   )[0].statistic) for k in groups]
                assert row[col] == pytest.approx(np.mean(rhos), abs=1e-12)
    # the monotone relation is recovered in each backbone with its own sign: never pooled
    assert _row(rows, "tiny", "end", "embedding_drift")["rho"] < -0.9
    assert _row(rows, "tiny", "end", "cka_mean")["rho"] > 0.95
    assert _row(rows, "ViT-B/32", "end", "cka_mean")["rho"] < -0.95
    # a signal no run measured (weight drift) has no row; test accuracy only at the end
    assert not any(r["name"] == "weight_drift" for r in rows)
    acc = [r for r in rows if r["name"] == "test_acc"]
    assert {r["when"] for r in acc} == {"end"} and all(math.isnan(r["rho"]) for r in acc)
    lead = [r for r in rows if r["model"] == "tiny" and r["when"] == "end"]
    assert lead[0]["rank"] == 1 and lead[0]["gap"] == 0.0


def test_bootstrap_resamples_setting_cells_like_an_explicit_loop():
    runs, _ = _store()
    sample = next(s for s in samples(runs) if s.model == "tiny")
    x = sample.signal("cka_mean", ("epoch", 1.0))  # with missing values (seed 2)
    n_cells = int(sample.cells.max()) + 1
    assert n_cells == 8 and len(sample.runs) == 24  # 2 datasets x 2 methods x 2 lrs
    draws = draw_cells(n_cells, 300, seed=3)
    got = bootstrap_abs_rho(x, sample.y, sample.cells, draws)
    for b, d in enumerate(draws):
        members = np.concatenate([np.flatnonzero(sample.cells == c) for c in d])
        res, _ = _scipy(x[members], sample.y[members])
        assert got[b] == pytest.approx(abs(res.statistic), abs=1e-10, nan_ok=True)
    # the table's CI: percentiles of these |ρ| (the same draws: seed 0, 2000 resamples)
    row = _row(predictor_rows(runs, n_boot=2000), "tiny", "epoch 1", "cka_mean")
    boot = bootstrap_abs_rho(x, sample.y, sample.cells, draw_cells(n_cells, 2000, seed=0))
    lo, hi = np.percentile(boot[np.isfinite(boot)], [2.5, 97.5])
    assert (row["ci_lo"], row["ci_hi"]) == pytest.approx((lo, hi))


def test_weighted_spearman_is_spearman_of_the_expanded_sample_with_ties():
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0])
    y = np.array([0.3, 0.1, 0.1, 0.9, 0.5, 0.7])
    w = np.array([[1, 2, 0, 1, 3, 1], [0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], float)
    got = weighted_spearman(x, y, w)
    for b in range(3):
        rep = np.repeat(np.arange(6), w[b].astype(int))
        want = stats.spearmanr(x[rep], y[rep]).statistic
        assert got[b] == pytest.approx(want, abs=1e-12)


def test_table_has_one_row_per_task_signal_and_point():
    runs, _ = _store()
    table = predictors(runs)
    keys = [(r["model"], r["task"], r["when"], r["name"]) for r in table.rows]
    assert len(keys) == len(set(keys))
    assert {r["when"] for r in table.rows} == {"end", "epoch 1", "25% of training"}
    assert predictors([]).skipped


def test_the_early_point_is_configurable_for_the_whole_report():
    """`reading_early_at` (the report's --early-fraction) moves the early reading point of
    the table: at 50% of training the last value measured by then is the 25% probe's, so the
    ρ are those of the 25% rows; outside the block the default is back."""
    runs, _ = _store()
    default = {(r["model"], r["task"], r["name"]): r["rho"] for r in predictors(runs).rows
               if r["when"] == "25% of training"}
    with reading_early_at(0.5):
        table = predictors(runs)
    assert {r["when"] for r in table.rows} == {"end", "epoch 1", "50% of training"}
    assert "at 50% of training" in table.caption
    half = {(r["model"], r["task"], r["name"]): r["rho"] for r in table.rows
            if r["when"] == "50% of training"}
    assert half.keys() == default.keys()
    assert all(half[k] == default[k] or (math.isnan(half[k]) and math.isnan(default[k]))
               for k in half)
    assert {r["when"] for r in predictors(runs).rows} == {"end", "epoch 1", "25% of training"}
    with pytest.raises(ValueError, match="between 0 and 1"), reading_early_at(1.5):
        pass


def test_selection_utility_picks_the_least_changed_candidate():
    from attndrift.analysis.frontier import MARGIN_POINTS, pareto, selection_rows

    runs, _ = _store()
    tiny = [r for r in runs if r.config["model"] == "tiny"
            and r.config["data"]["dataset"] == "shapes-objects"]
    accs = [0.90, 0.885, 0.95, 0.70, 0.94, 0.935] * 2  # candidates: within 2 points of 0.95
    for r, acc in zip(tiny, accs, strict=True):
        r.record["final"]["best_val_acc"] = acc
    cands = [r for r, a in zip(tiny, accs, strict=True) if a >= 0.95 - MARGIN_POINTS / 100]
    assert len(cands) == 6
    rows = selection_rows(tiny)
    y = [r.record["zeroshot"][TASK]["retention_pct"] for r in cands]
    best = max(y)
    # CKA at the end: least change = highest CKA; embedding drift: lowest
    for name, label, key in (("cka_mean", "CKA to pretrained (mean)", max),
                             ("embedding_drift", "embedding drift", min)):
        values = [(r.record["final"]["aux"]["cka_cls"][0] if name == "cka_mean"
                   else r.record["final"]["aux"]["embedding_drift"]) for r in cands]
        picked = cands[values.index(key(values))]
        row = next(r for r in rows if r["when"] == "end" and r["signal"] == label)
        assert row["candidates"] == 6 and row["best"] == best
        assert row["retention"] == picked.record["zeroshot"][TASK]["retention_pct"]
        assert row["regret"] == pytest.approx(best - row["retention"])
    anyone = next(r for r in rows if r["signal"] == "any candidate (expected)")
    assert anyone["regret"] == pytest.approx(np.mean([best - v for v in y]))
    assert pareto([(1, 1), (2, 0.5), (0.5, 2), (0.9, 0.9), (2, 0.5), (math.nan, 3)]) == [
        True, True, True, False, True, False]


def test_first_screen_names_the_early_leader():
    from attndrift.analysis.predictors import early_warning
    from attndrift.analysis.table import summary_specs

    assert early_warning in [s.build for s in summary_specs() if s.slot == "early_warning"]
    runs, _ = _store()
    lines = early_warning(runs)
    assert len(lines) == 2  # one per backbone (one task), in backbone id order
    lead = _row(predictor_rows(runs), "tiny", "epoch 1", "cka_mean")
    assert lead["rank"] == 1
    assert lines[1].startswith("tiny → shapes-zs-shape, best predictor of final retention after "
                               f"epoch 1: CKA to pretrained (mean) (ρ = {lead['rho']:+.2f}")
    assert early_warning([]) == []


def test_first_screen_names_a_signal_without_transfer_data_when_the_track_leads():
    """The zero-shot track is the transfer task subsampled: when it leads, the first screen
    also names the best signal that needs no transfer data (here CKA, the store's leader)."""
    import copy
    import dataclasses

    from attndrift.analysis.predictors import early_warning

    runs, _ = _store()
    tracked = []
    for r in runs:
        rec = copy.deepcopy(r.record)
        y = rec["zeroshot"][TASK]["retention_pct"]
        rec["baseline"]["zeroshot_subset"] = {TASK: 0.5}
        for p in rec["history"]["probes"]:
            p["zeroshot"] = {TASK: 0.5 * y / 100}  # retained on the track exactly as at the end
        tracked.append(dataclasses.replace(r, record=rec))
    rows = predictor_rows(tracked)
    lead = next(r for r in rows if r["model"] == "tiny" and r["when"] == "epoch 1")
    assert lead["name"] == "zeroshot_track" and lead["rho"] == pytest.approx(1.0)
    cka = _row(rows, "tiny", "epoch 1", "cka_mean")
    line = next(x for x in early_warning(tracked) if x.startswith("tiny →"))
    assert ("after epoch 1: zero-shot track retention (ρ = +1.00, |ρ| 95% CI" in line
            and f"; without transfer data: CKA to pretrained (mean) (ρ = {cka['rho']:+.2f})"
            in line), line
    # where a signal without transfer data leads, nothing is added
    assert all("without transfer data" not in x for x in early_warning(runs))


@pytest.mark.parametrize("stopped", [1, 2])
def test_first_screen_counts_guard_stopped_runs_and_leaves_them_out(stopped):
    import copy
    import dataclasses

    from attndrift.analysis.predictors import early_warning

    runs, _ = _store()
    marked = []
    for i, r in enumerate(runs):
        rec = copy.deepcopy(r.record)
        if i < stopped:
            rec["guard"] = {"stopped": True}
        marked.append(dataclasses.replace(r, record=rec))
    last = early_warning(marked)[-1]
    assert last == ("1 run stopped by its guard" if stopped == 1 else
                    f"{stopped} runs stopped by their guard") + \
        " (table 'Guarded runs'; left out of the ranking)."
    n = max(r["n"] for r in predictor_rows(marked) if r["model"] == runs[0].config["model"])
    assert n == sum(r.config["model"] == runs[0].config["model"] for r in runs) - stopped


def test_ranking_lines_list_the_leaders_and_signed_entropy():
    from attndrift.analysis.predictors import ranking_lines

    runs, _ = _store()
    lines = ranking_lines(runs, top=2)
    assert len(lines) == 6  # 2 backbones x 1 task x 3 points
    tiny_epoch1 = next(x for x in lines if x.startswith("tiny → shapes-zs-shape, epoch 1"))
    assert "(24 runs)" in tiny_epoch1 and "1. CKA to pretrained (mean) +" in tiny_epoch1
