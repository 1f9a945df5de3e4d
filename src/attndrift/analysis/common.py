"""Shared readers for the table builders: a run's drift, accuracy, zero-shot and convergence,
and how runs group into settings (replicates over seeds) and are labelled.

Drift, as the matched-LR preprint (002 §3) reports it, is the mean over the fixed probe
subsets of each subset's drift (``final.delta_pct_subset_mean``): `SUBSET_MEAN`, the default of
every table. `SUBSET0` reads the drift on the first subset, the one also probed during training
and the only one measured per layer (``final.delta_pct``); per-layer tables and trajectories
always use it, and say so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from attndrift.analysis.metadata import SHORT, core_metrics
from attndrift.analysis.runs import (
    Run,
    dataset_of,
    factors,
    lr_of,
    method_label,
    model_of,
    regularizer_label,
    setting_key,
    short_model,
)
from attndrift.analysis.settings import Setting, group_settings, other_labels, setting_order
from attndrift.analysis.table import Column

SUBSET_MEAN, SUBSET0 = "subset_mean", "subset0"
DRIFTS = {SUBSET_MEAN: "drift = mean over the fixed probe subsets of each subset's drift (002)",
          SUBSET0: "drift on probe subset 0 (the subset probed during training)"}
PER_LAYER_NOTE = "per-layer values are measured on probe subset 0 only"

DESCRIBE = (Column("model", "backbone"), Column("dataset", "dataset"),
            Column("method", "method"), Column("regularizer", "regularizer"),
            Column("lr", "lr", "lr"), Column("other", "other settings"))

# Late-epoch validation accuracy sd below which a run counts as converged (003 §4.5).
CONVERGED_SD, LATE_EPOCHS = 0.005, 3


def completed(runs: Iterable[Run]) -> list[Run]:
    return [r for r in runs if r.ok]


def final(run: Run) -> dict[str, Any]:
    return (run.record or {}).get("final") or {}


def num(value: Any) -> float:
    """A record's number as float; None (JSON null, e.g. a NaN written out) and others -> NaN."""
    return float(value) if isinstance(value, int | float) else math.nan


def delta(run: Run, metric: str, drift: str = SUBSET_MEAN) -> float:
    """Drift % of the layer-mean ``metric``: `SUBSET_MEAN` (default) or `SUBSET0`. A record
    without subset means counts as the subset-0 drift only when it probed a single subset."""
    fin = final(run)
    if drift == SUBSET_MEAN:
        means = fin.get("delta_pct_subset_mean")
        if means is None and (run.config.get("probe") or {}).get("subsets") == 1:
            means = fin.get("delta_pct")
        return num((means or {}).get(metric))
    if drift != SUBSET0:
        raise ValueError(f"drift must be {SUBSET_MEAN!r} or {SUBSET0!r}, not {drift!r}")
    return num((fin.get("delta_pct") or {}).get(metric))


def resolve_drift(runs: Iterable[Run], drift: str = SUBSET_MEAN) -> str:
    """``drift``, except that a store none of whose completed runs recorded subset means (records
    written before attndrift wrote them) is read on subset 0, not shown as all n/a. A store
    where some runs have them keeps the subset mean: the others read n/a, never a mix."""
    done = completed(runs)
    if drift == SUBSET_MEAN and done and not any(
            final(r).get("delta_pct_subset_mean") is not None for r in done):
        return SUBSET0
    return drift


def layer_deltas(run: Run, metric: str = "entropy") -> list[float]:
    """Per-layer drift % (probe subset 0), layer 1 first; [] when not recorded."""
    return [num(v) for v in (final(run).get("delta_pct_layers") or {}).get(metric) or []]


def last_layer_delta(run: Run, metric: str = "entropy") -> float:
    layers = layer_deltas(run, metric)
    return layers[-1] if layers else math.nan


def absolute(run: Run, metric: str, when: str = "final") -> float:
    """Layer-mean value of ``metric`` (its own unit) before ("baseline") or after training."""
    block = (run.record or {}).get("baseline") if when == "baseline" else final(run).get("metrics")
    return num(((block or {}).get("mean") or {}).get(metric))


def text_tower(run: Run) -> str:
    """The text tower zero-shot ran through: 'pretrained' for every attndrift run (it is
    frozen), a measured checkpoint's own ('fine-tuned') when it changed it (issue 22 item 6)."""
    ft = ((run.record or {}).get("provenance") or {}).get("finetuned") or {}
    return "fine-tuned" if ft.get("text_tower") == "fine-tuned" else "pretrained"


def zs_tasks(runs: Iterable[Run]) -> list[str]:
    return sorted({t for r in runs for t in ((r.record or {}).get("zeroshot") or {})},
                  key=str.casefold)


def zs(run: Run, task: str, key: str = "after") -> float:
    return num((((run.record or {}).get("zeroshot") or {}).get(task) or {}).get(key))


def val_history(run: Run) -> list[float]:
    return [num(e.get("val_acc")) for e in ((run.record or {}).get("history") or {}).get(
        "epochs") or [] if isinstance(e, dict)]


def late_val_sd(run: Run, epochs: int = LATE_EPOCHS) -> float:
    """Population sd (numpy's default, as the study's scripts) of the validation accuracy of
    the last ``epochs`` epochs; NaN with fewer epochs or a missing value among them."""
    vals = val_history(run)[-epochs:]
    if len(vals) < epochs or not all(math.isfinite(v) for v in vals):
        return math.nan
    return float(np.std(np.asarray(vals, dtype=float)))


def converged(run: Run) -> bool | None:
    """Whether the late-epoch validation accuracy sd is below 0.005 (003 §4.5's check); None
    when the record has fewer than three epochs of validation accuracy."""
    sd = late_val_sd(run)
    return None if math.isnan(sd) else bool(sd < CONVERGED_SD)


@dataclass(frozen=True)
class Context:
    """Labels of the settings of a store, computed once per table: the full label (what
    distinguishes a setting from every other) and the 'other settings' column."""

    labels: dict[tuple, str]
    other: dict[tuple, str]


def context(runs: Sequence[Run]) -> Context:
    groups = group_settings(runs)
    others = other_labels([factors(s.config) for s in groups])
    return Context({s.key: s.label for s in groups},
                   {s.key: o for s, o in zip(groups, others, strict=True)})


def describe(run: Run, ctx: Context) -> dict[str, Any]:
    """The descriptive cells of a run: backbone, dataset, method, regularizer, lr, other
    settings, seed; plus (not shown as columns) its setting's label and sort key."""
    cfg = run.config
    key = setting_key(cfg)
    return {"run": run.name, "model": short_model(model_of(cfg)), "dataset": dataset_of(cfg),
            "method": method_label(cfg), "regularizer": regularizer_label(cfg),
            "lr": lr_of(cfg), "seed": cfg.get("seed"), "other": ctx.other.get(key, "—"),
            "setting": ctx.labels.get(key, ""), "_order": setting_order(cfg)}


def order(row: dict[str, Any]) -> tuple:
    """Sort rows by setting (model, dataset, method, regularizer, other, lr), then seed."""
    seed = row.get("seed")
    return (row.get("_order", ()), str(row.get("setting", "")).casefold(),
            seed if isinstance(seed, int) else -1)


def settings(runs: Sequence[Run]) -> list[Setting]:
    """Runs with a readable config grouped into settings (see `runs.factors`), in order."""
    return group_settings(runs)


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample sd (ddof 1) of the finite values; NaN where undefined, never a warning."""
    a = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan


def metric_columns(prefix: str = "d_", with_sd: bool = False,
                   metrics: Sequence[str] | None = None) -> list[Column]:
    return [Column(f"{prefix}{m}", f"Δ {SHORT.get(m, m)} %", "pct",
                   f"{prefix}{m}_sd" if with_sd else None) for m in (metrics or core_metrics())]


def zs_columns(tasks: Sequence[str], with_sd: bool = False, key: str = "after") -> list[Column]:
    if key == "retention_pct":
        return [Column(f"ret_{t}", f"zero-shot {t} retained %", "pct0",
                       f"ret_{t}_sd" if with_sd else None) for t in tasks]
    return [Column(f"zs_{t}", f"zero-shot {t} %", "acc", f"zs_{t}_sd" if with_sd else None)
            for t in tasks]


def aggregate(group: Sequence[Run], tasks: Sequence[str], drift: str = SUBSET_MEAN
              ) -> dict[str, Any]:
    """Mean and sample sd over one setting's completed seeds of accuracy, drift, last-layer
    entropy drift, zero-shot accuracy and retention; ``members`` names the runs averaged."""
    done = completed(group)
    row: dict[str, Any] = {"n": len(done), "not_completed": len(group) - len(done),
                           "not_converged": sum(converged(r) is False for r in done),
                           "members": tuple(str(r.path) for r in done)}
    values = {"best_val_acc": [num(final(r).get("best_val_acc")) for r in done],
              "test_acc": [num(final(r).get("test_acc")) for r in done],
              "d_entropy_last": [last_layer_delta(r) for r in done]}
    values.update({f"d_{m}": [delta(r, m, drift) for r in done] for m in core_metrics()})
    values.update({f"zs_{t}": [zs(r, t) for r in done] for t in tasks})
    values.update({f"ret_{t}": [zs(r, t, "retention_pct") for r in done] for t in tasks})
    for key, vals in values.items():
        row[key], row[f"{key}_sd"] = mean_sd(vals)
    return row


def drift_note(drift: str) -> str:
    return DRIFTS[drift].capitalize() + "."
