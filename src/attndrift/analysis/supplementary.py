"""Supplementary tables: auxiliary metrics, collapse onset, the grid aggregate and provenance."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from attndrift.analysis.common import (
    DESCRIBE,
    completed,
    delta,
    describe,
    extra_keys,
    final,
    mean_sd,
    metric_columns,
    num,
    order,
    zs,
    zs_columns,
    zs_tasks,
)
from attndrift.analysis.metadata import AUX, SHORT, core_metrics
from attndrift.analysis.onset import ONSET_THRESHOLD_PCT, collapse_onset, peak_velocity, trajectory
from attndrift.analysis.runs import Run, dataset_of, lr_of, method_label, regularizer_label
from attndrift.analysis.table import Column, Table, make_table


def _aux_values(aux: dict[str, Any]) -> dict[str, float]:
    """Scalars of an ``aux`` block: floats as they are, per-layer lists as their mean,
    ``subset_cv`` as one value per metric."""
    out: dict[str, float] = {}
    for key, value in aux.items():
        if isinstance(value, int | float):
            out[key] = float(value)
        elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            out[key] = sum(value) / len(value)
        elif key == "subset_cv" and isinstance(value, dict):
            out.update({f"subset_cv_{m}": num(v) for m, v in value.items()})
    return out


def auxiliary(runs: Sequence[Run]) -> Table:
    keys, rows, found = extra_keys(runs), [], set()
    pretrained: dict[str, dict[str, float]] = {}
    for r in completed(runs):
        values = _aux_values(final(r).get("aux") or {})
        base = _aux_values(((r.record or {}).get("baseline") or {}).get("aux") or {})
        if base:
            pretrained.setdefault(dataset_of(r.config), base)
        if not values:
            continue
        found |= set(values)
        row = describe(r, keys)
        row.update(values)
        rows.append(row)
    rows = sorted(rows, key=order)
    for dataset, base in sorted(pretrained.items()):
        found |= set(base) if rows else set()
        rows.insert(0, {"run": "pretrained", "dataset": dataset, "method": "—", **base})
    known = [k for k in AUX if k in found]
    cv = sorted(k for k in found if k.startswith("subset_cv_"))
    rest = sorted(found - set(known) - set(cv))
    cols = (Column("run", "run"), *DESCRIBE, Column("seed", "seed", "int"),
            *(Column(k, AUX[k][0], "num") for k in known),
            *(Column(k, f"subset CV of {SHORT.get(k[10:], k[10:])}", "num") for k in cv),
            *(Column(k, k, "num") for k in rest))
    meaning = "; ".join(f"{AUX[k][0]}: {AUX[k][1]}" for k in known)
    return make_table("auxiliary", "Auxiliary metrics",
                      "Rollout, patch-to-patch, CKA, subset sensitivity and drift measures "
                      "beyond CLS→patch attention, where the runs recorded them (per-layer CKA "
                      "shown as its layer mean; subset CV = coefficient of variation over "
                      f"balanced probe subsets). {meaning}.", cols,
                      rows if any(r["run"] != "pretrained" for r in rows) else [],
                      "no run recorded auxiliary metrics (final.aux)")


def collapse_onsets(runs: Sequence[Run]) -> Table:
    keys, rows = extra_keys(runs), []
    for r in runs:
        if r.record is None or not (r.record.get("history") or {}).get("probes"):
            continue
        fractions, deltas = trajectory(r.record, "entropy")
        row = describe(r, keys)
        onset = collapse_onset(fractions, deltas)
        finite = [d for d in deltas[1:] if math.isfinite(d)]  # probes, not the (0, 0) start
        row.update({"status": r.status, "probes": len(fractions) - 1,
                    "onset": "never" if onset is None else onset,
                    "min_delta": min(finite) if finite else math.nan,
                    "final_delta": delta(r, "entropy") if r.ok else math.nan,
                    "velocity": peak_velocity(fractions, deltas)})
        rows.append(row)
    cols = (Column("run", "run"), *DESCRIBE, Column("seed", "seed", "int"),
            Column("status", "status"), Column("probes", "probes", "int"),
            Column("onset", "onset (fraction of training)", "num"),
            Column("min_delta", "lowest Δ entropy %", "pct"),
            Column("final_delta", "final Δ entropy %", "pct"),
            Column("velocity", "peak velocity (%/training)", "num"))
    return make_table("collapse_onset", "Collapse onset",
                      f"Onset = the first probe at which layer-mean entropy is more than "
                      f"{-ONSET_THRESHOLD_PCT:g}% below the pretrained value, as a fraction of "
                      "training ('never' if it stays above). Peak velocity = the steepest change "
                      "of Δ entropy between consecutive probes, per unit of training.",
                      cols, sorted(rows, key=order), "no run recorded attention probes")


def grid_aggregate(runs: Sequence[Run]) -> Table:
    done, tasks = completed(runs), zs_tasks(completed(runs))
    cells: dict[tuple[str, str, str], list[Run]] = {}
    for r in done:
        cfg = r.config
        cells.setdefault((dataset_of(cfg), method_label(cfg), regularizer_label(cfg)),
                         []).append(r)
    rows = []
    for (dataset, method, reg), group in sorted(cells.items()):
        lrs = {lr_of(r.config) for r in group}
        if len(lrs) < 2:
            continue
        row: dict[str, Any] = {"dataset": dataset, "method": method, "regularizer": reg,
                               "lrs": len(lrs), "n": len(group)}
        row["best_val_acc"] = mean_sd(num(final(r).get("best_val_acc")) for r in group)[0]
        row.update({f"d_{m}": mean_sd(delta(r, m) for r in group)[0] for m in core_metrics()})
        row.update({f"zs_{t}": mean_sd(zs(r, t) for r in group)[0] for t in tasks})
        rows.append(row)
    cols = (Column("dataset", "dataset"), Column("method", "method"),
            Column("regularizer", "regularizer"), Column("lrs", "learning rates", "int"),
            Column("n", "runs", "int"), Column("best_val_acc", "best val acc %", "acc"),
            *metric_columns(), *zs_columns(tasks))
    return make_table("grid_aggregate", "Aggregate over the learning-rate grid",
                      "Per dataset × method: means over every completed run of the grid (all "
                      "learning rates and seeds), as in the matched-LR study's Table 1. Averages "
                      "over learning rates can hide regimes (e.g. an underfitting low lr): read "
                      "with the matched-LR table.", cols, rows,
                      "no method was run at two or more learning rates")


def provenance(runs: Sequence[Run]) -> Table:
    rows = []
    for r in runs:
        if r.record is None:
            continue
        prov = r.record.get("provenance") or {}
        sizes = ((prov.get("data") or {}).get("sizes")) or {}
        rows.append({"run": r.name, "status": r.status,
                     **{k: prov.get(k) for k in ("attndrift", "python", "torch", "transformers",
                                                 "peft", "device", "gpu", "platform",
                                                 "git_commit", "model_sha256")},
                     "train_images": sizes.get("train"), "probe_images": sizes.get("probe")})
    cols = (Column("run", "run"), Column("status", "status"), Column("attndrift", "attndrift"),
            Column("python", "python"), Column("torch", "torch"),
            Column("transformers", "transformers"), Column("peft", "peft"),
            Column("device", "device"), Column("gpu", "gpu"), Column("platform", "platform"),
            Column("git_commit", "git commit"), Column("model_sha256", "model sha256"),
            Column("train_images", "train images", "int"),
            Column("probe_images", "probe images", "int"))
    return make_table("provenance", "Provenance per run",
                      "Software versions, device, code revision and model hash each run "
                      "recorded.", cols, rows, "no readable records")
