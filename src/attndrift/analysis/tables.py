"""The study's descriptive tables, built from whatever runs a store holds.

Each function takes the store's runs and returns a `Table` (rows of raw values). Tables that
do not apply (no regularized runs, a single learning rate, no auxiliary metrics...) come back
empty with the reason in ``skipped``. Only completed runs enter result tables; every run, of
any status, is in `run_status`, and per-setting tables count the runs that did not complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from attndrift.analysis.common import (
    DESCRIBE,
    PER_LAYER_NOTE,
    SUBSET_MEAN,
    Context,
    absolute,
    aggregate,
    completed,
    context,
    delta,
    describe,
    drift_note,
    final,
    mean_sd,
    metric_columns,
    num,
    order,
    settings,
    text_tower,
    zs,
    zs_columns,
    zs_tasks,
)
from attndrift.analysis.metadata import SHORT, core_metrics, metric_info
from attndrift.analysis.runs import (
    LR_KEYS,
    Run,
    dataset_of,
    factors,
    family_key,
    model_of,
    regularizer_label,
    short_model,
)
from attndrift.analysis.settings import Setting
from attndrift.analysis.table import Column, Table, make_table, register_table

RUN = Column("run", "run")
SEED = Column("seed", "seed", "int")
ACC = (Column("best_val_acc", "best val acc %", "acc"), Column("test_acc", "test acc %", "acc"))
COUNTS = (Column("n", "seeds", "int"), Column("not_completed", "not completed", "int"))


@register_table("runs", "runs", order=10, store=True)
def run_status(runs: Sequence[Run], store_root: str = "", drift: str = SUBSET_MEAN) -> Table:
    ctx = context(runs)
    rows = []
    for r in runs:
        timing = (r.record or {}).get("timing") or {}
        row = describe(r, ctx) if r.record else {"run": r.name}
        row.update({"dir": str(r.path.relative_to(store_root)) if store_root else str(r.path),
                    "run_id": r.run_id, "status": r.status,
                    "error": (r.error or "")[:300] or "—",
                    "steps": (final(r) or {}).get("step"), "total_s": num(timing.get("total_s"))})
        rows.append(row)
    # a study's run directory is named by its run id: the id gets a column only where it says
    # something the directory does not
    same = all(r.run_id == r.path.name for r in runs)
    cols = (Column("dir", "directory"), *(() if same else (Column("run_id", "run id"),)),
            Column("status", "status"), Column("model", "backbone"),
            Column("dataset", "dataset"), Column("method", "method"),
            Column("lr", "lr", "lr"), SEED, Column("steps", "steps", "int"),
            Column("total_s", "time s", "num"), Column("error", "error"))
    return make_table("runs", "All runs",
                      "Every run directory in the store with its status. Only completed runs "
                      "enter the result tables; failed, diverged, running (or dead), corrupt and "
                      "missing runs are listed here with the reason."
                      + (" Each directory is named by its run id." if same and runs else ""),
                      cols, rows, "the store holds no run directories")


@register_table("main_comparison", "results", order=20)
def main_comparison(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    done, ctx = completed(runs), context(runs)
    tasks = zs_tasks(done)
    rows = []
    for r in done:
        row = describe(r, ctx)
        row.update({"best_val_acc": num(final(r).get("best_val_acc")),
                    "test_acc": num(final(r).get("test_acc"))})
        row.update({f"d_{m}": delta(r, m, drift) for m in core_metrics()})
        row.update({f"zs_{t}": zs(r, t) for t in tasks})
        rows.append(row)
    cols = (RUN, *DESCRIBE, SEED, *ACC, *metric_columns(), *zs_columns(tasks))
    return make_table("main_comparison", "Main comparison",
                      "One row per completed run: task accuracy (best validation epoch; test "
                      "read once at the end), drift of the layer-mean metrics vs the pretrained "
                      "model, 100 (adapted - pretrained) / pretrained, and zero-shot accuracy "
                      f"after adaptation per transfer task. {drift_note(drift)}", cols,
                      sorted(rows, key=order), "no completed runs")


def _baselines(runs: Sequence[Run]) -> list[tuple[str, str, dict[str, Any]]]:
    """(backbone, probe images from, baseline block) once per backbone and probe set (the probe
    and data keys that choose the images; operational ones such as ``probe.zeroshot_every`` or
    ``probe.batch_size`` do not make another probe set)."""
    seen, out = set(), []
    for r in completed(runs):
        cfg = r.config
        probe_set = sorted((k, repr(v)) for k, v in factors(cfg).items()
                           if k.startswith(("probe.", "data.")))
        key = (model_of(cfg), dataset_of(cfg), repr(probe_set))
        base = (r.record or {}).get("baseline") or {}
        if key in seen or not base:
            continue
        seen.add(key)
        out.append((short_model(key[0]), key[1], base))
    return sorted(out, key=lambda b: (b[0].casefold(), b[1].casefold()))


@register_table("baseline_structure", "results", order=40)
def baseline_structure(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    rows = []
    for model, dataset, base in _baselines(runs):
        n_layers = len((base.get("entropy") or {}).get("layers") or [])
        for i in range(n_layers):
            row = {"model": model, "dataset": dataset, "layer": i + 1}
            for m in core_metrics():
                layers = (base.get(m) or {}).get("layers") or []
                row[m] = num(layers[i]) if i < len(layers) else None
            rows.append(row)
    info = metric_info()
    cols = (Column("model", "backbone"), Column("dataset", "probe images from"),
            Column("layer", "layer", "int"),
            *(Column(m, f"{info[m].label} ({info[m].unit})" if info[m].unit else info[m].label,
                     "num") for m in core_metrics()))
    return make_table("baseline_structure", "Pretrained attention structure per layer",
                      "The pretrained model's CLS→patch metrics per layer on each probe set "
                      "(means over probe images and heads; probe subset 0). "
                      + "; ".join(f"{v.label}: {v.meaning}" for v in info.values()) + ".",
                      cols, rows, "no completed run has a baseline")


@register_table("baseline_summary", "results", order=30)
def baseline_summary(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    """003 §3.1: per metric, mean ± sd over the layers of the pretrained model and the range."""
    rows = []
    info = metric_info()
    for model, dataset, base in _baselines(runs):
        for m in core_metrics():
            layers = np.asarray([num(v) for v in (base.get(m) or {}).get("layers") or []])
            layers = layers[np.isfinite(layers)]
            rows.append({"model": model, "dataset": dataset, "metric": info[m].label,
                         "unit": info[m].unit or "—", "layers": int(layers.size),
                         "mean": float(layers.mean()) if layers.size else None,
                         "sd": float(layers.std(ddof=1)) if layers.size > 1 else None,
                         "min": float(layers.min()) if layers.size else None,
                         "max": float(layers.max()) if layers.size else None})
    cols = (Column("model", "backbone"), Column("dataset", "probe images from"),
            Column("metric", "metric"), Column("unit", "unit"), Column("layers", "layers", "int"),
            Column("mean", "mean ± sd over layers", "num", "sd"),
            Column("min", "lowest layer", "num"), Column("max", "highest layer", "num"))
    return make_table("baseline_summary", "Pretrained attention structure: summary",
                      "As in the study's baseline analysis (003 §3.1): each core metric of the "
                      "pretrained model, mean ± sample sd over its layers and the per-layer "
                      "range, per backbone and probe set (probe subset 0).", cols, rows,
                      "no completed run has a baseline")


@register_table("absolute_metrics", "results", order=50)
def absolute_metrics(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    """003 §6.1: the layer-mean metrics before (pretrained) and after training, per setting."""
    ctx, rows = context(runs), []
    for s in settings(runs):
        done = s.completed
        if not done:
            continue
        row = _describe_setting(s, ctx)
        row.update(aggregate(done, (), drift))
        for m in core_metrics():
            row[f"{m}_0"] = mean_sd([absolute(r, m, "baseline") for r in done])[0]
            row[f"{m}_f"], row[f"{m}_f_sd"] = mean_sd([absolute(r, m) for r in done])
        rows.append(row)
    info = metric_info()
    cols = (*DESCRIBE, COUNTS[0], Column("best_val_acc", "best val acc %", "acc"))
    for m in core_metrics():
        unit = f" ({info[m].unit})" if info[m].unit else ""
        cols += (Column(f"{m}_0", f"{SHORT.get(m, m)}₀{unit}", "num"),
                 Column(f"{m}_f", f"{SHORT.get(m, m)} final{unit}", "num", f"{m}_f_sd"),
                 Column(f"d_{m}", f"Δ {SHORT.get(m, m)} %", "pct"))
    return make_table("absolute_metrics", "Absolute metrics: pretrained and final",
                      "As in the study's full-metrics appendix (003 §6.1): per setting, the "
                      "layer-mean value of each metric for the pretrained model (₀, probe "
                      "subset 0) and after training (mean ± sd over seeds, subset 0), and its "
                      f"drift. {drift_note(drift)}", cols, sorted(rows, key=order),
                      "no completed runs")


def _describe_setting(s: Setting, ctx: Context) -> dict[str, Any]:
    row = describe(s.runs[0], ctx)
    row.pop("seed"), row.pop("run")
    row["seeds"] = ", ".join(str(x) for x in s.seeds)  # numeric order
    row["weight_decay"] = num((s.config.get("train") or {}).get("weight_decay"))
    return row


def _setting_rows(groups: Sequence[Setting], ctx: Context, tasks: Sequence[str],
                  drift: str) -> list[dict[str, Any]]:
    rows = []
    for g in groups:
        row = _describe_setting(g, ctx)
        row.update(aggregate(g.runs, tasks, drift))
        rows.append(row)
    return sorted(rows, key=order)


@register_table("lr_sweep", "results", order=60)
def lr_sweep(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    ctx, tasks = context(runs), zs_tasks(completed(runs))
    by_rest: dict[tuple, list[Setting]] = {}
    for g in settings(runs):
        by_rest.setdefault(family_key(g.config, LR_KEYS), []).append(g)
    groups = [g for sweep in by_rest.values()
              if len({g.config["train"]["lr"] for g in sweep if g.completed}) >= 2
              for g in sweep]
    cols = (*DESCRIBE, *COUNTS, ACC[1], *metric_columns(), *zs_columns(tasks))
    return make_table("lr_sweep", "Learning-rate sweep",
                      "Settings that differ only in the learning rate, means over completed "
                      "seeds (spread in the matched-LR table). The trend test (exact "
                      "permutation correlation of log10 lr with Δ entropy) is in the corrected "
                      f"inference table. {drift_note(drift)}", cols,
                      _setting_rows(groups, ctx, tasks, drift),
                      "no setting was run at two or more learning rates")


@register_table("matched_lr", "results", order=10)
def matched_lr(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    """The matched-LR aggregate as 002 publishes it: per setting n, test accuracy, Δ of the
    layer-mean metrics, Δ entropy of the last layer, zero-shot retention per task."""
    ctx, tasks = context(runs), zs_tasks(completed(runs))
    cols = (*DESCRIBE, *COUNTS, Column("not_converged", "not converged", "int"),
            Column("test_acc", "test acc %", "acc", "test_acc_sd"),
            *metric_columns(with_sd=True),
            Column("d_entropy_last", "Δ entropy last layer %", "pct", "d_entropy_last_sd"),
            *zs_columns(tasks, with_sd=True, key="retention_pct"))
    return make_table("matched_lr", "Matched-LR aggregate: mean ± sd over seeds",
                      "One row per setting (everything but the seed equal): mean ± sample sd "
                      "over its completed seeds (sd needs two). Test accuracy is read once, at "
                      "the end; Δ of the layer-mean metrics vs the pretrained model; Δ entropy "
                      f"of the last layer ({PER_LAYER_NOTE}); zero-shot retention = adapted / "
                      f"pretrained accuracy per transfer task. {drift_note(drift)} 'not "
                      "completed' counts the setting's failed, diverged or unfinished runs, "
                      "'not converged' its completed seeds that fail the convergence check.",
                      cols, _setting_rows(settings(runs), ctx, tasks, drift), "no completed runs")


def _regularization_family(family: list[Setting]) -> bool:
    """Settings equal but for regularizer and weight decay, at least one of which varies."""
    decays = {repr((g.config.get("train") or {}).get("weight_decay")) for g in family}
    return len(family) > 1 and (len(decays) > 1 or any(
        regularizer_label(g.config) != "none" for g in family))


@register_table("regularization", "results", order=90)
def regularization(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    ctx, tasks = context(runs), zs_tasks(completed(runs))
    by_rest: dict[tuple, list[Setting]] = {}
    for g in settings(runs):
        by_rest.setdefault(family_key(g.config, ("regularizer.", "train.weight_decay")),
                           []).append(g)
    groups = [g for family in by_rest.values() if _regularization_family(family)
              for g in family if g.completed]
    cols = (*DESCRIBE, Column("weight_decay", "weight decay", "num"), *COUNTS, ACC[1],
            *metric_columns(), *zs_columns(tasks))
    rows = _setting_rows(groups, ctx, tasks, drift)
    return make_table("regularization", "Regularization",
                      "Regularizers (APR, entropy floor, L2-SP) and weight-decay variants next "
                      "to the unregularized run of the same backbone, dataset, method and lr; "
                      "means over completed seeds. Tests vs the unregularized setting, "
                      "Holm-adjusted across the family, are in the corrected inference table. "
                      f"{drift_note(drift)}", cols, rows,
                      "no regularized or weight-decay variant next to an unregularized run")


_ZS_EXTRA = (("top5_before", "top-5 pretrained %"), ("top5_after", "top-5 adapted %"),
             ("recall_before", "mean recall pretrained %"),
             ("recall_after", "mean recall adapted %"))


def _zs_extra(run: Run, task: str) -> dict[str, float]:
    entry = (((run.record or {}).get("zeroshot") or {}).get(task) or {})
    out = {}
    for name, key in (("top5", "top5"), ("recall", "mean_recall")):
        pair = entry.get(key) if isinstance(entry.get(key), dict) else {}
        out[f"{name}_before"], out[f"{name}_after"] = num(pair.get("before")), num(
            pair.get("after"))
    return out


@register_table("zeroshot", "results", order=110)
def zeroshot(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    ctx, rows = context(runs), []
    for r in completed(runs):
        for task in sorted((r.record or {}).get("zeroshot") or {}, key=str.casefold):
            row = describe(r, ctx)
            row.update({"task": task, "before": zs(r, task, "before"), "after": zs(r, task),
                        "retention_pct": zs(r, task, "retention_pct"),
                        "chance": zs(r, task, "chance"), "d_entropy": delta(r, "entropy", drift),
                        **_zs_extra(r, task), "text_tower": text_tower(r)})
            rows.append(row)
    # top-5 and mean per-class recall: only where some record has them (issue 21)
    extra = [Column(k, label, "acc") for k, label in _ZS_EXTRA
             if any(np.isfinite(row.get(k, np.nan)) for row in rows)]
    cols = (RUN, *DESCRIBE, SEED, Column("task", "transfer task"),
            Column("before", "pretrained %", "acc"), Column("after", "adapted %", "acc"),
            Column("retention_pct", "retained %", "pct0"), *extra,
            Column("chance", "chance %", "acc"), Column("d_entropy", "Δ entropy %", "pct"),
            Column("text_tower", "text tower"))
    return make_table("zeroshot", "Zero-shot transfer",
                      "Zero-shot accuracy through the adapted image encoder (LoRA active) with "
                      "the pretrained text tower (frozen in every attndrift run; a measured "
                      "checkpoint's own where it changed it, column 'text tower'), before and "
                      "after adaptation; retained = after / before; top-5 (none for five "
                      "classes or fewer) and mean per-class recall where recorded. "
                      f"{drift_note(drift)}", cols,
                      sorted(rows, key=lambda r: (r["task"].casefold(), order(r))),
                      "no completed run evaluated zero-shot transfer")


@register_table("per_layer_delta", "results", order=120)
def per_layer_delta(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    ctx, rows, width = context(runs), [], 0
    for r in completed(runs):
        layers = final(r).get("delta_pct_layers") or {}
        for m in core_metrics():
            values = layers.get(m) or []
            if not values:
                continue  # not recorded (e.g. head diversity of a single-head model)
            width = max(width, len(values))
            row = describe(r, ctx)
            row.update({"metric": SHORT.get(m, m)})
            row.update({f"L{i + 1}": num(v) for i, v in enumerate(values)})
            rows.append(row)
    rank = {SHORT.get(m, m): i for i, m in enumerate(core_metrics())}  # metrics in their order
    cols = (RUN, *DESCRIBE, SEED, Column("metric", "metric"),
            *(Column(f"L{i + 1}", f"L{i + 1}", "pct") for i in range(width)))
    return make_table("per_layer_delta", "Per-layer drift (%)",
                      "Drift of each layer's metric vs the pretrained model (layer 1 = nearest "
                      f"the input; {PER_LAYER_NOTE}). Descriptive: layers of one model are not "
                      "independent samples.", cols,
                      sorted(rows, key=lambda r: (order(r), rank[r["metric"]])),
                      "no completed runs")
