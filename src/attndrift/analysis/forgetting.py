"""Forgetting during training: zero-shot retention and attention drift against progress, and
whether early drift predicts the final retention.

A run with ``probe.zeroshot_every > 0`` measures zero-shot accuracy on a fixed class-balanced
subset of each transfer task at the start (``baseline.zeroshot_subset``) and at every k-th probe
(``history.probes[i].zeroshot``). Retention at a point is 100 x accuracy / the subset's
pretrained accuracy; Δ entropy is the study's drift of the layer-mean CLS entropy (003 §1.4),
both read at the same probes, so which one moves first can be seen.

Early drift is Δ entropy over 10-20% of training (the mean of the probes in that window, or the
value interpolated at 15% where no probe falls in it); final retention is the record's
``zeroshot[task].retention_pct`` (the whole test split). Their association is a Spearman rank
correlation with a permutation p (exact over all n! pairings for n <= 8; 000 replaced
small-sample p-values by exact permutation tests, §3.5). Settings are never pooled as if they were
replicates (`attndrift.analysis.runs.setting_key`): within a setting the units are its seeds;
across the settings of one dataset, model and task each setting is one point, its seed mean.

Reads records only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from attndrift.analysis.common import DESCRIBE, SUBSET_MEAN, context, describe, mean_sd, num
from attndrift.analysis.onset import trajectory
from attndrift.analysis.runs import Run, dataset_of, model_of, short_model
from attndrift.analysis.settings import Setting, group_settings
from attndrift.analysis.stats import permutation_corr_test
from attndrift.analysis.table import Column, Table, make_table, register_table

EARLY_WINDOW = (0.10, 0.20)  # share of training whose drift is "early"
CHECKPOINTS = (0.1, 0.2, 0.5, 1.0)  # progress points of the dynamics table


def tracked_tasks(record: dict[str, Any]) -> list[str]:
    """Transfer tasks whose zero-shot accuracy the run measured during training."""
    return sorted((record.get("baseline") or {}).get("zeroshot_subset") or {})


def retention_trajectory(record: dict[str, Any], task: str) -> tuple[np.ndarray, np.ndarray]:
    """``(fractions, retention %)`` of zero-shot on ``task``'s fixed subset, from (0, 100)
    through every probe that measured it."""
    base = num(((record.get("baseline") or {}).get("zeroshot_subset") or {}).get(task))
    xs, ys = [0.0], [100.0 if base > 0 else math.nan]
    for probe in (record.get("history") or {}).get("probes") or []:
        acc = (probe.get("zeroshot") or {}).get(task)
        if acc is not None:
            xs.append(num(probe.get("fraction")))
            ys.append(100.0 * num(acc) / base if base > 0 else math.nan)
    return np.asarray(xs), np.asarray(ys)


def entropy_trajectory(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(fractions, Δ entropy %)`` of the layer-mean CLS entropy at every probe, from (0, 0)
    (`onset.trajectory`, the drift the collapse-onset table reads)."""
    return trajectory(record, "entropy")


def value_at(xs: np.ndarray, ys: np.ndarray, fraction: float) -> float:
    """``ys`` linearly interpolated at ``fraction``; NaN outside the measured range."""
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    if xs.size == 0 or fraction < xs[0] or fraction > xs[-1] + 1e-9:
        return math.nan
    return float(np.interp(fraction, xs, ys))


def early_drift(record: dict[str, Any], window: tuple[float, float] = EARLY_WINDOW) -> float:
    """Mean Δ entropy % of the probes within ``window`` of training (interpolated at its middle
    when none falls inside)."""
    xs, ys = entropy_trajectory(record)
    inside = (xs >= window[0]) & (xs <= window[1]) & np.isfinite(ys)
    if inside.any():
        return float(ys[inside].mean())
    return value_at(xs, ys, (window[0] + window[1]) / 2)


def final_retention(record: dict[str, Any], task: str) -> float:
    return num(((record.get("zeroshot") or {}).get(task) or {}).get("retention_pct"))


def _tracked(runs: Sequence[Run]) -> list[Run]:
    return [r for r in runs if r.ok and tracked_tasks(r.record)]


def _settings(runs: Sequence[Run]) -> list[Setting]:
    """The settings (`settings.group_settings`) of the runs that tracked zero-shot."""
    return group_settings(_tracked(runs))


def _mean(values: Sequence[float]) -> float:
    return mean_sd(values)[0]


@register_table("forgetting_dynamics", "forgetting", order=10)
def forgetting_dynamics(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    """Per setting and transfer task, mean over seeds of zero-shot retention and Δ entropy at
    10, 20, 50 and 100% of training. (Δ entropy over training is read on probe subset 0, the
    only one probed during training; ``drift`` is accepted for the common signature.)"""
    ctx = context(_tracked(runs))
    rows = []
    for setting in _settings(runs):
        group = list(setting.runs)
        for task in tracked_tasks(group[0].record):
            row = {**describe(group[0], ctx), "task": task, "n": len(group),
                   "members": tuple(str(r.path) for r in group)}
            for c in CHECKPOINTS:
                row[f"ret_{c:g}"] = _mean([value_at(*retention_trajectory(r.record, task), c)
                                           for r in group])
                row[f"dh_{c:g}"] = _mean([value_at(*entropy_trajectory(r.record), c)
                                          for r in group])
            rows.append(row)
    rows.sort(key=lambda r: (r["_order"], r["task"].casefold()))
    cols = [*DESCRIBE, Column("task", "zero-shot task"), Column("n", "seeds", "int")]
    cols += [Column(f"ret_{c:g}", f"retention @{c:.0%}", "pct0") for c in CHECKPOINTS]
    cols += [Column(f"dh_{c:g}", f"Δ entropy @{c:.0%}", "pct") for c in CHECKPOINTS]
    return make_table(
        "forgetting_dynamics", "Forgetting during training",
        "Zero-shot retention (% of the pretrained accuracy on a fixed class-balanced subset of "
        "the task) and Δ entropy at the same points of training, mean over seeds of one "
        "setting (interpolated between probes). Which moves first: compare the columns.",
        cols, rows, "no completed run measured zero-shot during training "
        "(set probe.zeroshot_every > 0)")


def _corr_row(base: dict[str, Any], unit: str, x: list[float], y: list[float]) -> dict:
    res = permutation_corr_test(x, y, "spearman")
    how = "exact" if "exact" in res.test else "Monte Carlo" if "Monte" in res.test else "—"
    return {**base, "unit": unit, "n": res.n, "rho": res.statistic, "p": res.pvalue,
            "test": how}


@register_table("early_drift_vs_retention", "forgetting", order=20)
def early_drift_vs_retention(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    """Spearman rho of early Δ entropy (10-20% of training) with final zero-shot retention,
    with its permutation p: across the seeds of each setting, and across the settings (seed
    means) of each dataset, model and task."""
    ctx = context(_tracked(runs))
    rows = []
    strata: dict[tuple[str, str, str], list[list[Run]]] = {}
    for setting in _settings(runs):
        group = list(setting.runs)
        d = describe(group[0], ctx)
        for task in tracked_tasks(group[0].record):
            strata.setdefault((dataset_of(setting.config), model_of(setting.config), task),
                              []).append(group)
            if len(group) >= 3:
                rows.append(_corr_row(
                    {**d, "task": task}, "seeds of this setting",
                    [early_drift(r.record) for r in group],
                    [final_retention(r.record, task) for r in group]))
    for (dataset, model, task), groups in strata.items():
        if len(groups) >= 3:
            rows.append(_corr_row(
                {"dataset": dataset, "model": short_model(model), "task": task,
                 "method": "all settings", "regularizer": "—", "lr": math.nan, "other": "—"},
                "settings (seed means)",
                [_mean([early_drift(r.record) for r in g]) for g in groups],
                [_mean([final_retention(r.record, task) for r in g]) for g in groups]))
    rows.sort(key=lambda r: (r["model"], r["dataset"].casefold(), r["task"].casefold(),
                             r["unit"], r.get("_order", ()), str(r["lr"])))
    cols = (*DESCRIBE, Column("task", "zero-shot task"), Column("unit", "units"),
            Column("n", "n", "int"), Column("rho", "Spearman ρ", "num"), Column("p", "p", "p"),
            Column("test", "permutations"))
    return make_table(
        "early_drift_vs_retention", "Does early attention drift predict forgetting?",
        f"Spearman ρ between Δ entropy early in training ({EARLY_WINDOW[0]:.0%}-"
        f"{EARLY_WINDOW[1]:.0%} of the steps) and the final zero-shot retention, with its "
        "permutation p (exact for n <= 8). Units are the seeds of one setting, or whole "
        "settings (seed means) of one dataset, model and task: settings are never pooled as "
        "replicates. Correlational, not causal.",
        cols, rows, "needs completed runs with zero-shot tracked during training: 3 seeds of a "
        "setting, or 3 settings of one dataset and task")
