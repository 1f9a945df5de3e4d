"""Shared readers for the table builders: a run's drift, accuracy, zero-shot, and how to label
and group runs into settings (replicates over seeds)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from attndrift.analysis.metadata import SHORT, core_metrics
from attndrift.analysis.runs import (
    Run,
    dataset_of,
    flat_config,
    lr_of,
    method_label,
    regularizer_label,
    setting_key,
    varying_keys,
)
from attndrift.analysis.table import Column

# Keys already shown in their own columns (dataset, method label, lr, regularizer label).
SHOWN = frozenset({"data.dataset", "method", "train.lr", "lora.r", "lora.targets",
                   "freeze_layers", "regularizer.name", "regularizer.lam",
                   "regularizer.ratio", "regularizer.layers"})

DESCRIBE = (Column("dataset", "dataset"), Column("method", "method"),
            Column("regularizer", "regularizer"), Column("lr", "lr", "lr"),
            Column("other", "other settings"))


def completed(runs: Iterable[Run]) -> list[Run]:
    return [r for r in runs if r.ok]


def final(run: Run) -> dict[str, Any]:
    return (run.record or {}).get("final") or {}


def num(value: Any) -> float:
    """A record's number as float; None (JSON null, e.g. a NaN written out) and others -> NaN."""
    return float(value) if isinstance(value, int | float) else math.nan


def delta(run: Run, metric: str) -> float:
    return num((final(run).get("delta_pct") or {}).get(metric))


def zs_tasks(runs: Iterable[Run]) -> list[str]:
    return sorted({t for r in runs for t in ((r.record or {}).get("zeroshot") or {})})


def zs(run: Run, task: str, key: str = "after") -> float:
    return num((((run.record or {}).get("zeroshot") or {}).get(task) or {}).get(key))


def extra_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys that vary between the runs beyond the ones with their own column."""
    return [k for k in varying_keys(r.config for r in runs if r.record) if k not in SHOWN]


def other_label(run: Run, keys: Sequence[str]) -> str:
    flat = flat_config(run.config)
    method = run.config.get("method")
    shown = [k for k in keys
             if not (k.startswith("lora.") and method != "lora")
             and not (k == "freeze_layers" and method != "freeze")]
    return ", ".join(f"{k}={_fmt(flat.get(k))}" for k in shown) or "—"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "+".join(map(str, value))
    return str(value)


def describe(run: Run, keys: Sequence[str]) -> dict[str, Any]:
    cfg = run.config
    return {"run": run.name, "dataset": dataset_of(cfg), "method": method_label(cfg),
            "regularizer": regularizer_label(cfg), "lr": lr_of(cfg), "seed": cfg.get("seed"),
            "other": other_label(run, keys)}


def order(row: dict[str, Any]) -> tuple:
    """Sort rows by dataset, method, regularizer, other settings, lr, seed."""
    seed = row.get("seed")
    return (str(row.get("dataset")).casefold(), str(row.get("method")).casefold(),
            str(row.get("regularizer")), str(row.get("other")), num(row.get("lr")),
            seed if isinstance(seed, int) else -1)


def settings(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs with a readable config grouped into settings (identical but for the seed)."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.record is not None:
            groups.setdefault(setting_key(r.config), []).append(r)
    return list(groups.values())


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan


def metric_columns(prefix: str = "d_", with_sd: bool = False,
                   metrics: Sequence[str] | None = None) -> list[Column]:
    return [Column(f"{prefix}{m}", f"Δ {SHORT.get(m, m)} %", "pct",
                   f"{prefix}{m}_sd" if with_sd else None) for m in (metrics or core_metrics())]


def zs_columns(tasks: Sequence[str], with_sd: bool = False) -> list[Column]:
    return [Column(f"zs_{t}", f"zero-shot {t} %", "acc", f"zs_{t}_sd" if with_sd else None)
            for t in tasks]


def aggregate(group: Sequence[Run], tasks: Sequence[str]) -> dict[str, Any]:
    """Mean and sd over a setting's completed seeds of accuracy, drift and zero-shot."""
    done = completed(group)
    row: dict[str, Any] = {"n": len(done), "not_completed": len(group) - len(done)}
    values = {"best_val_acc": [num(final(r).get("best_val_acc")) for r in done],
              "test_acc": [num(final(r).get("test_acc")) for r in done]}
    values.update({f"d_{m}": [delta(r, m) for r in done] for m in core_metrics()})
    values.update({f"zs_{t}": [zs(r, t) for r in done] for t in tasks})
    for key, vals in values.items():
        row[key], row[f"{key}_sd"] = mean_sd(vals)
    return row
