"""Supplementary tables: auxiliary metrics, collapse onset, the grid aggregate, convergence
and provenance."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from attndrift.analysis.common import (
    CONVERGED_SD,
    DESCRIBE,
    LATE_EPOCHS,
    SUBSET0,
    SUBSET_MEAN,
    completed,
    context,
    converged,
    delta,
    describe,
    drift_note,
    final,
    late_val_sd,
    mean_sd,
    metric_columns,
    num,
    order,
    val_history,
    zs,
    zs_columns,
    zs_tasks,
)
from attndrift.analysis.metadata import AUX, SHORT, core_metrics
from attndrift.analysis.onset import ONSET_THRESHOLD_PCT, collapse_onset, peak_velocity, trajectory
from attndrift.analysis.runs import LR_KEYS, Run, lr_of, model_of, short_model
from attndrift.analysis.settings import group_families
from attndrift.analysis.table import Column, Table, make_table, register_table

# Entropies the matched-LR preprint reports in bits (002 Table 2); records hold nats.
BITS = ("rollout_entropy", "p2p_entropy", "p2p_entropy_layers")
LN2 = math.log(2.0)


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


def _with_bits(values: dict[str, float]) -> dict[str, float]:
    out = dict(values)
    for key in BITS:
        if key in values:
            out[f"{key}_bits"] = values[key] / LN2
    return out


@register_table("auxiliary", "results", order=100)
def auxiliary(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    ctx, rows, found = context(runs), [], set()
    pretrained: dict[tuple[str, str], dict[str, float]] = {}
    for r in completed(runs):
        values = _with_bits(_aux_values(final(r).get("aux") or {}))
        base = _with_bits(_aux_values(((r.record or {}).get("baseline") or {}).get("aux") or {}))
        if base:
            pretrained.setdefault((short_model(model_of(r.config)),
                                   str((r.config.get("data") or {}).get("dataset"))), base)
        if not values:
            continue
        found |= set(values)
        row = describe(r, ctx)
        row.update(values)
        rows.append(row)
    rows = sorted(rows, key=order)
    for (model, dataset), base in sorted(pretrained.items(), reverse=True):
        found |= set(base) if rows else set()
        rows.insert(0, {"run": "pretrained", "model": model, "dataset": dataset,
                        **dict.fromkeys(("method", "regularizer", "lr", "other", "seed"), "—"),
                        **base})
    known = []
    for k in AUX:
        known += [k] if k in found else []
        known += [f"{k}_bits"] if f"{k}_bits" in found else []
    cv = sorted(k for k in found if k.startswith("subset_cv_"))
    rest = sorted(found - set(known) - set(cv))

    def label(k: str) -> str:
        if k.endswith("_bits"):
            return f"{AUX[k[:-5]][0]} (bits)"
        return AUX[k][0] + (" (nats)" if k in BITS else "")

    cols = (Column("run", "run"), *DESCRIBE, Column("seed", "seed", "int"),
            *(Column(k, label(k), "num") for k in known),
            *(Column(k, f"subset CV of {SHORT.get(k[10:], k[10:])}", "num") for k in cv),
            *(Column(k, k, "num") for k in rest))
    meaning = "; ".join(f"{AUX[k][0]}: {AUX[k][1]}" for k in known if k in AUX)
    return make_table("auxiliary", "Auxiliary metrics",
                      "Rollout, patch-to-patch, CKA, subset sensitivity and drift measures "
                      "beyond CLS→patch attention, where the runs recorded them (per-layer CKA "
                      "shown as its layer mean; subset CV = coefficient of variation over "
                      "balanced probe subsets). Rollout and patch-to-patch entropy in nats as "
                      "recorded and in bits (÷ ln 2) as the matched-LR preprint reports them "
                      f"(002 Table 2). {meaning}.", cols,
                      rows if any(r["run"] != "pretrained" for r in rows) else [],
                      "no run recorded auxiliary metrics (final.aux)")


@register_table("collapse_onset", "dynamics", order=10)
def collapse_onsets(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    ctx, rows = context(runs), []
    for r in runs:
        if r.record is None or not (r.record.get("history") or {}).get("probes"):
            continue
        fractions, deltas = trajectory(r.record, "entropy")
        row = describe(r, ctx)
        onset = collapse_onset(fractions, deltas)
        finite = [d for d in deltas[1:] if math.isfinite(d)]  # probes, not the (0, 0) start
        row.update({"status": r.status, "probes": len(fractions) - 1,
                    "onset": "never" if onset is None else onset,
                    "min_delta": min(finite) if finite else math.nan,
                    "final_delta": delta(r, "entropy", SUBSET0) if r.ok else math.nan,
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
                      "of Δ entropy between consecutive probes, per unit of training. Probes "
                      "during training measure probe subset 0, so every drift here, the final "
                      "one included, is the subset-0 drift.",
                      cols, sorted(rows, key=order), "no run recorded attention probes")


@register_table("grid_aggregate", "results", order=70)
def grid_aggregate(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    """002 Table 1: means over a learning-rate grid, within one family of settings (same
    backbone, dataset, method and everything else but the lr)."""
    ctx, tasks, rows = context(runs), zs_tasks(completed(runs)), []
    for fam in group_families(runs, LR_KEYS):
        done = [r for s in fam.settings for r in s.completed]
        lrs = sorted({lr_of(s.config) for s in fam.settings if s.completed})
        if len(lrs) < 2:
            continue
        row = describe(done[0], ctx)
        for key in ("run", "seed", "lr", "setting"):
            row.pop(key)
        row.update({"family": fam.label, "lrs": len(lrs),
                    "lr_values": ", ".join(f"{x:g}" for x in lrs), "n": len(done),
                    "members": tuple(str(r.path) for r in done)})
        row["best_val_acc"] = mean_sd(num(final(r).get("best_val_acc")) for r in done)[0]
        row["test_acc"] = mean_sd(num(final(r).get("test_acc")) for r in done)[0]
        row.update({f"d_{m}": mean_sd(delta(r, m, drift) for r in done)[0]
                    for m in core_metrics()})
        row.update({f"zs_{t}": mean_sd(zs(r, t) for r in done)[0] for t in tasks})
        rows.append(row)
    cols = (*(c for c in DESCRIBE if c.key != "lr"), Column("lr_values", "learning rates"),
            Column("n", "runs", "int"), Column("best_val_acc", "best val acc %", "acc"),
            Column("test_acc", "test acc %", "acc"), *metric_columns(), *zs_columns(tasks))
    return make_table("grid_aggregate", "Aggregate over the learning-rate grid",
                      "Per family of settings equal but for the learning rate (one backbone, "
                      "dataset, method, regularizer and every other setting): means over every "
                      "completed run of its grid (all learning rates and seeds), as in the "
                      "matched-LR study's Table 1. Averages over learning rates can hide "
                      "regimes (e.g. an underfitting low lr): read with the matched-LR table. "
                      f"{drift_note(drift)}", cols, sorted(rows, key=order),
                      "no setting was run at two or more learning rates")


@register_table("convergence", "runs", order=20)
def convergence(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    """003 §4.5: a run converged when its late-epoch validation accuracy sd is below 0.005."""
    ctx, rows = context(runs), []
    for r in completed(runs):
        row = describe(r, ctx)
        vals = val_history(r)
        flag = converged(r)
        row.update({"epochs": len(vals), "late_sd": late_val_sd(r),
                    "converged": "n/a" if flag is None else ("yes" if flag else "NO"),
                    "last_val": vals[-1] if vals else math.nan})
        rows.append(row)
    cols = (Column("run", "run"), *DESCRIBE, Column("seed", "seed", "int"),
            Column("epochs", "epochs", "int"), Column("last_val", "last val acc %", "acc"),
            # fixed decimals: read against the 0.005 threshold, one digit pattern per column
            Column("late_sd", f"sd of last {LATE_EPOCHS} val acc", "f4"),
            Column("converged", "converged"))
    flagged = sum(r["converged"] == "NO" for r in rows)
    return make_table("convergence", "Convergence check",
                      f"The study's check (003 §4.5): a run converged when the population sd of "
                      f"its validation accuracy over the last {LATE_EPOCHS} epochs is below "
                      f"{CONVERGED_SD} (n/a: fewer than {LATE_EPOCHS} epochs recorded). "
                      + (f"{flagged} run(s) did NOT converge: read their rows with care."
                         if flagged else "Every run with enough epochs converged."),
                      cols, sorted(rows, key=order), "no completed runs")


@register_table("provenance", "provenance", order=10, fold=("run", "status"))
def provenance(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
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
