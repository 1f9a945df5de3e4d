"""Correlations across runs, each within one backbone and dataset (never pooled across them:
their baselines differ, so a pooled correlation would mostly measure the difference).

- `metric_correlations`: drift, accuracy and zero-shot retention against each other (003 §3.10).
- `cka_correlation`: layer-mean CKA to the pretrained model vs Δ entropy, and the strongest
  per-layer association (002 Table 3).
- `transfer_retention`: retained attention (Δ entropy) vs retained zero-shot accuracy, and vs
  accuracy, per dataset over all its methods as 002 §5.2 reports it, and per method.

Runs in one scope differ in method, lr and more: correlations are descriptive, with scipy's
asymptotic two-sided p.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from attndrift.analysis import stats
from attndrift.analysis.common import (
    SUBSET_MEAN,
    completed,
    delta,
    drift_note,
    final,
    layer_deltas,
    num,
    zs,
    zs_tasks,
)
from attndrift.analysis.inference import outcome_columns
from attndrift.analysis.runs import Run, dataset_of, method_label, model_of, short_model
from attndrift.analysis.table import Column, Table, make_table, register_table

SCOPE = Column("scope", "runs of")
CORR_COLS = (Column("n", "runs", "int"), Column("r", "Pearson r", "num"), Column("p", "p", "p"),
             Column("rho", "Spearman ρ", "num"), Column("p_rho", "p (ρ)", "p"))


def scopes(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    """Completed runs by backbone and dataset, labelled 'ViT-B/32 · eurosat'."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in completed(runs):
        groups.setdefault((short_model(model_of(r.config)), dataset_of(r.config)), []).append(r)
    return [(f"{m} · {d}", groups[(m, d)])
            for m, d in sorted(groups, key=lambda k: (k[0].casefold(), k[1].casefold()))]


def _corr(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Pearson and Spearman of the pairwise-complete values; NaN when fewer than 3 or constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    out = {"n": int(keep.sum()), "r": math.nan, "p": math.nan, "rho": math.nan,
           "p_rho": math.nan}
    m = stats.correlation_matrix({"a": a[keep], "b": b[keep]}, "pearson")
    s = stats.correlation_matrix({"a": a[keep], "b": b[keep]}, "spearman")
    out.update({"r": float(m.r[0, 1]), "p": float(m.p[0, 1]), "rho": float(s.r[0, 1]),
                "p_rho": float(s.p[0, 1])})
    return out


@register_table("metric_correlations", "statistics", order=70)
def metric_correlations(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    rows = []
    for scope, members in scopes(runs):
        if len(members) < 3:
            continue
        data = outcome_columns(members, drift)
        pear = stats.correlation_matrix(data, "pearson")
        spear = stats.correlation_matrix(data, "spearman")
        for i, j in itertools.combinations(range(len(pear.names)), 2):
            if math.isfinite(pear.r[i, j]):
                rows.append({"scope": scope, "a": pear.names[i], "b": pear.names[j],
                             "n": int(pear.n[i, j]), "r": pear.r[i, j], "p": pear.p[i, j],
                             "rho": spear.r[i, j], "p_rho": spear.p[i, j]})
    cols = (SCOPE, Column("a", "A"), Column("b", "B"), *CORR_COLS)
    return make_table("metric_correlations", "Cross-metric correlations",
                      "Correlations across the completed runs of one backbone and dataset of "
                      "drift, accuracy and zero-shot retention (003 §3.10; asymptotic two-sided "
                      "p of scipy). Descriptive: runs differ in several factors at once, so a "
                      f"correlation is not the effect of one. {drift_note(drift)}", cols, rows,
                      "needs three or more completed runs of one backbone and dataset")


def _cka_layers(run: Run) -> list[float]:
    value = (final(run).get("aux") or {}).get("cka_cls")
    return [num(v) for v in value] if isinstance(value, list) else []


@register_table("cka_correlation", "statistics", order=60)
def cka_correlation(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    rows = []
    for scope, members in scopes(runs):
        have = [r for r in members if _cka_layers(r)]
        if len(have) < 3:
            continue
        mean_cka = [float(np.mean(_cka_layers(r))) for r in have]
        row = {"scope": scope, "analysis": "run-level mean CKA vs Δ entropy"}
        row.update(_corr(mean_cka, [delta(r, "entropy", drift) for r in have]))
        rows.append(row)
        width = min(min(len(_cka_layers(r)), len(layer_deltas(r))) for r in have)
        best = None
        for i in range(width):
            res = _corr([_cka_layers(r)[i] for r in have], [layer_deltas(r)[i] for r in have])
            if math.isfinite(res["r"]) and (best is None or abs(res["r"]) > abs(best[1]["r"])):
                best = (i, res)
        if best is not None:
            rows.append({"scope": scope, "analysis": f"strongest per-layer association (layer "
                         f"{best[0] + 1} of {width}: CKA vs Δ entropy of that layer)", **best[1]})
    cols = (SCOPE, Column("analysis", "analysis"), *CORR_COLS)
    return make_table("cka_correlation", "CKA to the pretrained model vs Δ entropy",
                      "As the matched-LR preprint's Table 3: across the runs of one backbone "
                      "and dataset, CLS-token CKA of each layer to the pretrained model (layer "
                      "mean) against Δ entropy, and the layer whose CKA and Δ entropy correlate "
                      "most strongly (picked after looking: its p is not corrected for the "
                      f"choice; per-layer Δ on probe subset 0). {drift_note(drift)}", cols, rows,
                      "needs three or more completed runs of one backbone and dataset with CKA "
                      "recorded (probe.aux includes cka)")


@register_table("transfer_retention", "statistics", order=50)
def transfer_retention(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    tasks = zs_tasks(completed(runs))
    rows = []
    for scope, members in scopes(runs):
        by_method: dict[str, list[Run]] = {}
        for r in members:
            by_method.setdefault(method_label(r.config), []).append(r)
        groups = [("all methods", members),
                  *sorted(by_method.items(), key=lambda kv: kv[0].casefold())]
        if len(by_method) == 1:
            groups = groups[:1]
        for methods, group in groups:
            if len(group) < 3:
                continue
            d_ent = [delta(r, "entropy", drift) for r in group]
            pairs = [(f"Δ entropy vs retained zero-shot {t} %",
                      [zs(r, t, "retention_pct") for r in group]) for t in tasks]
            pairs += [("Δ entropy vs test acc", [num(final(r).get("test_acc")) for r in group]),
                      ("Δ entropy vs best val acc",
                       [num(final(r).get("best_val_acc")) for r in group])]
            for what, ys in pairs:
                res = _corr(d_ent, ys)
                if res["n"] >= 3:
                    rows.append({"scope": scope, "methods": methods, "pair": what, **res})
    cols = (SCOPE, Column("methods", "methods"), Column("pair", "correlation"), *CORR_COLS)
    return make_table("transfer_retention", "Retained attention vs retained transfer",
                      "As the matched-LR preprint's §5.2: across the runs of one backbone and "
                      "dataset (all methods, as 002 reports it, then each method alone), Δ "
                      "entropy against zero-shot retention per transfer task and against task "
                      "accuracy. Never pooled across backbones or datasets. Descriptive. "
                      f"{drift_note(drift)}", cols, rows,
                      "needs three or more completed runs of one backbone and dataset")
