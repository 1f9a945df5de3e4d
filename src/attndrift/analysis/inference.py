"""Inferential tables: run-level multi-seed comparisons, the corrected inference of the study,
and cross-metric correlations.

Units of inference: seeds (runs) in `run_level`; learning-rate settings (seed means) in the
learning-rate trend; layers only in tests labelled exploratory, because the layers of one model
are not independent samples (the original study's error). Holm-Bonferroni adjusts each family.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from attndrift.analysis import stats
from attndrift.analysis.common import (
    completed,
    delta,
    describe,
    extra_keys,
    final,
    num,
    settings,
    zs,
    zs_tasks,
)
from attndrift.analysis.metadata import SHORT, core_metrics
from attndrift.analysis.runs import (
    Run,
    flat_config,
    lr_of,
    method_label,
    regularizer_label,
    setting_key,
)
from attndrift.analysis.table import Column, Table, make_table

RUN_LEVEL = "run-level (seeds are the units)"
SETTING_LEVEL = "setting-level (seed means per lr are the units)"
EXPLORATORY = "exploratory (layers of one model as samples)"
_NOT_CONTRASTS = {"train.lr", "data.dataset"}  # lr has the trend test; datasets differ in baseline


def _factor(key: str) -> str:
    if key.startswith("regularizer."):
        return "regularizer"
    if key in ("method", "freeze_layers") or key.startswith("lora."):
        return "method"
    return key


def _level_label(group: list[Run], factor: str) -> str:
    cfg = group[0].config
    if factor == "method":
        return method_label(cfg)
    if factor == "regularizer":
        return regularizer_label(cfg)
    return f"{factor}={flat_config(cfg).get(factor)}"


def _is_reference(group: list[Run], factor: str) -> bool:
    cfg = group[0].config
    return ((factor == "method" and cfg.get("method") == "full_ft")
            or (factor == "regularizer" and regularizer_label(cfg) == "none"))


def contrasts(runs: Sequence[Run], min_seeds: int = 2) -> list[tuple[str, list[Run], list[Run]]]:
    """Pairs of settings with >= ``min_seeds`` completed seeds each that differ in exactly one
    factor (method, regularizer, or one other config key; not lr or dataset). The reference
    (full FT, no regularizer) comes first."""
    groups = [completed(g) for g in settings(runs) if len(completed(g)) >= min_seeds]
    out = []
    for a, b in itertools.combinations(groups, 2):
        ka, kb = dict(setting_key(a[0].config)), dict(setting_key(b[0].config))
        factors = {_factor(k) for k in set(ka) | set(kb) if ka.get(k) != kb.get(k)}
        if len(factors) != 1 or factors & _NOT_CONTRASTS:
            continue
        factor = factors.pop()
        if _is_reference(b, factor) and not _is_reference(a, factor):
            a, b = b, a
        out.append((factor, a, b))
    return out


def _outcomes(tasks: Sequence[str]) -> list[tuple[str, str, Any]]:
    out = [(f"Δ {SHORT.get(m, m)} %", "pct", lambda r, m=m: delta(r, m)) for m in core_metrics()]
    out.append(("best val acc %", "acc", lambda r: num(final(r).get("best_val_acc"))))
    out += [(f"zero-shot {t} %", "acc", lambda r, t=t: zs(r, t)) for t in tasks]
    return out


def run_level(runs: Sequence[Run]) -> Table:
    keys, tasks, rows = extra_keys(runs), zs_tasks(completed(runs)), []
    for factor, a, b in contrasts(runs):
        base = describe(a[0], keys)
        for label, fmt, get in _outcomes(tasks):
            xa, xb = [get(r) for r in a], [get(r) for r in b]
            w = stats.welch(xa, xb)
            rows.append({"dataset": base["dataset"], "lr": base["lr"], "factor": factor,
                         "a": _level_label(a, factor), "b": _level_label(b, factor),
                         "n": f"{len(a)} vs {len(b)}", "outcome": label, "fmt": fmt,
                         "mean_a": float(np.nanmean(xa)), "mean_b": float(np.nanmean(xb)),
                         "t": w.statistic, "p": w.pvalue,
                         "d": stats.cohens_d(xa, xb).statistic,
                         "p_mw": stats.mann_whitney(xa, xb).pvalue})
    for label, *_ in _outcomes(tasks):  # Holm within each outcome's family of contrasts
        family = [r for r in rows if r["outcome"] == label]
        for r, adj in zip(family, stats.holm([r["p"] for r in family]), strict=True):
            r["p_holm"] = float(adj)
    for r in rows:  # accuracy means read as %, drift already in %
        if r.pop("fmt") == "acc":
            r["mean_a"], r["mean_b"] = 100 * r["mean_a"], 100 * r["mean_b"]
    cols = (Column("dataset", "dataset"), Column("lr", "lr", "lr"), Column("factor", "factor"),
            Column("a", "A"), Column("b", "B"), Column("n", "seeds A vs B"),
            Column("outcome", "outcome"), Column("mean_a", "mean A", "num"),
            Column("mean_b", "mean B", "num"), Column("t", "Welch t", "num"),
            Column("p", "Welch p", "p"), Column("p_holm", "Holm p", "p"),
            Column("d", "Cohen's d", "num"), Column("p_mw", "Mann-Whitney p", "p"))
    return make_table("run_level", "Run-level multi-seed comparisons",
                      f"Settings that differ in one factor (same dataset and lr), each with two or "
                      f"more completed seeds; {RUN_LEVEL}. Welch t test (two-sided), Cohen's d "
                      "(A - B over the pooled sd), Mann-Whitney U (two-sided; with 3 vs 3 seeds "
                      "its smallest p is 0.1). Holm p adjusts across the contrasts of each "
                      "outcome.", cols, rows,
                      "no two settings with two or more completed seeds differ in one factor")


def _seed_mean_layers(group: list[Run], metric: str = "entropy") -> np.ndarray:
    per_run = [final(r).get("delta_pct_layers", {}).get(metric) or [] for r in group]
    width = min((len(p) for p in per_run), default=0)
    if width == 0:
        return np.zeros(0)
    return np.nanmean(np.array([[num(v) for v in p[:width]] for p in per_run]), axis=0)


def _row(family: str, comparison: str, res: stats.TestResult, level: str,
         note: str = "") -> dict[str, Any]:
    n = res.n if isinstance(res.n, int) else " vs ".join(map(str, res.n))
    return {"family": family, "comparison": comparison, "test": res.test, "level": level,
            "n": n, "statistic": res.statistic, "p": res.pvalue, "note": note}


def _lr_trend_rows(runs: Sequence[Run], keys: Sequence[str]) -> list[dict[str, Any]]:
    sweeps: dict[tuple, list[list[Run]]] = {}
    for g in settings(runs):
        if completed(g):
            rest = tuple(kv for kv in setting_key(g[0].config) if kv[0] != "train.lr")
            sweeps.setdefault(rest, []).append(completed(g))
    rows = []
    for sweep in sweeps.values():
        if len(sweep) < 3:
            continue
        sweep = sorted(sweep, key=lambda g: lr_of(g[0].config))
        x = np.log10([lr_of(g[0].config) for g in sweep])
        y = [float(np.nanmean([delta(r, "entropy") for r in g])) for g in sweep]
        d = describe(sweep[0][0], keys)
        what = (f"log10 lr vs Δ entropy: {d['dataset']}, {d['method']}"
                + (f", {d['regularizer']}" if d["regularizer"] != "none" else "")
                + (f", {d['other']}" if d["other"] != "—" else ""))
        seeds = sorted({len(g) for g in sweep})
        for method in ("pearson", "spearman"):
            res = stats.permutation_corr_test(x, y, method)
            rows.append(_row(f"lr trend ({method})", what, res, SETTING_LEVEL,
                             f"{len(sweep)} learning rates; seeds per lr: "
                             f"{'/'.join(map(str, seeds))}"))
    return rows


def _regularizer_rows(runs: Sequence[Run], keys: Sequence[str]) -> list[dict[str, Any]]:
    families: dict[tuple, list[list[Run]]] = {}
    for g in settings(runs):
        if completed(g):
            rest = tuple(kv for kv in setting_key(g[0].config)
                         if not kv[0].startswith("regularizer."))
            families.setdefault(rest, []).append(completed(g))
    rows = []
    for family in families.values():
        refs = [g for g in family if regularizer_label(g[0].config) == "none"]
        if not refs or len(family) < 2:
            continue
        ref = refs[0]
        ref_layers = _seed_mean_layers(ref)
        d = describe(ref[0], keys)
        where = f"{d['dataset']}, {d['method']}, lr {d['lr']:g}"
        for g in family:
            if g is ref:
                continue
            label = f"{regularizer_label(g[0].config)} vs none ({where})"
            layers = _seed_mean_layers(g)
            if layers.size and layers.size == ref_layers.size and layers.size >= 2:
                rows.append(_row("regularizer, per layer", label,
                                 stats.paired_t(layers, ref_layers), EXPLORATORY,
                                 "paired over layers of per-layer Δ entropy (seed means)"))
            if len(g) >= 2 and len(ref) >= 2:
                rows.append(_row("regularizer, run-level", label,
                                 stats.welch([delta(r, "entropy") for r in g],
                                             [delta(r, "entropy") for r in ref]), RUN_LEVEL,
                                 "Δ entropy of each seed"))
    return rows


def _layer_position_rows(runs: Sequence[Run], keys: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for g in settings(runs):
        done = completed(g)
        layers = _seed_mean_layers(done) if done else np.zeros(0)
        if layers.size < 6:  # three groups of at least two layers
            continue
        thirds = np.array_split(layers, 3)
        d = describe(done[0], keys)
        rows.append(_row("layer position", f"early vs middle vs late layers: {d['dataset']}, "
                         f"{d['method']}, {d['regularizer']}, lr {d['lr']:g}",
                         stats.anova_oneway(*thirds), EXPLORATORY,
                         "per-layer Δ entropy (seed means) in three contiguous layer groups"))
    return rows


def corrected_inference(runs: Sequence[Run]) -> Table:
    keys = extra_keys(runs)
    rows = (_lr_trend_rows(runs, keys) + _regularizer_rows(runs, keys)
            + _layer_position_rows(runs, keys))
    for family in {r["family"] for r in rows}:
        members = [r for r in rows if r["family"] == family]
        for r, adj in zip(members, stats.holm([r["p"] for r in members]), strict=True):
            r["p_holm"] = float(adj)
    cols = (Column("family", "family"), Column("comparison", "comparison"),
            Column("level", "inference"), Column("n", "n"),
            Column("statistic", "statistic", "num"), Column("p", "p", "p"),
            Column("p_holm", "Holm p (family)", "p"), Column("test", "test"),
            Column("note", "note"))
    return make_table("inference", "Corrected inference",
                      "The study's corrected statistics recomputed from the store: the "
                      "learning-rate trend by exact permutation correlation (all n! pairings for "
                      "n <= 8), regularizers vs no regularizer, and layer position. Holm p "
                      "adjusts within each family. Rows marked exploratory treat layers of one "
                      "model as samples and are descriptive only; method contrasts over seeds "
                      "are in the run-level table.", cols, rows,
                      "needs three or more learning rates of one setting, a regularized run "
                      "next to an unregularized one, or a model with six or more layers")


def outcome_columns(runs: Sequence[Run]) -> dict[str, list[float]]:
    """Run-level outcomes of the completed runs, by display name (for correlations)."""
    done = completed(runs)
    data = {f"Δ {SHORT.get(m, m)}": [delta(r, m) for r in done] for m in core_metrics()}
    data["best val acc"] = [num(final(r).get("best_val_acc")) for r in done]
    for t in zs_tasks(done):
        data[f"retained {t}"] = [zs(r, t, "retention_pct") for r in done]
    return data


def metric_correlations(runs: Sequence[Run]) -> Table:
    data = outcome_columns(runs)
    rows = []
    if len(completed(runs)) >= 3:
        pear = stats.correlation_matrix(data, "pearson")
        spear = stats.correlation_matrix(data, "spearman")
        for i, j in itertools.combinations(range(len(pear.names)), 2):
            if math.isfinite(pear.r[i, j]):
                rows.append({"a": pear.names[i], "b": pear.names[j], "n": int(pear.n[i, j]),
                             "r": pear.r[i, j], "p": pear.p[i, j], "rho": spear.r[i, j],
                             "p_rho": spear.p[i, j]})
    cols = (Column("a", "A"), Column("b", "B"), Column("n", "runs", "int"),
            Column("r", "Pearson r", "num"), Column("p", "p", "p"),
            Column("rho", "Spearman ρ", "num"), Column("p_rho", "p (ρ)", "p"))
    return make_table("metric_correlations", "Cross-metric correlations",
                      "Correlations across completed runs of drift, accuracy and zero-shot "
                      "retention (asymptotic two-sided p of scipy). Descriptive: runs differ in "
                      "several factors at once, so a correlation is not the effect of one.",
                      cols, rows,
                      "needs three or more completed runs with varying metrics")
