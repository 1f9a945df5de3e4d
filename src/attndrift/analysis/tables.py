"""The study's descriptive tables, built from whatever runs a store holds.

Each function takes the store's runs and returns a `Table` (rows of raw values). Tables that
do not apply (no regularized runs, a single learning rate, no auxiliary metrics...) come back
empty with the reason in ``skipped``. Only completed runs enter result tables; every run, of
any status, is in `run_status`, and per-setting tables count the runs that did not complete.
"""

from __future__ import annotations

from collections.abc import Sequence

from attndrift.analysis.common import (
    DESCRIBE,
    aggregate,
    completed,
    delta,
    describe,
    extra_keys,
    final,
    metric_columns,
    num,
    order,
    settings,
    zs,
    zs_columns,
    zs_tasks,
)
from attndrift.analysis.metadata import SHORT, core_metrics, metric_info
from attndrift.analysis.runs import Run, lr_of, regularizer_label, setting_key
from attndrift.analysis.table import Column, Table, make_table

RUN = Column("run", "run")
SEED = Column("seed", "seed", "int")
ACC = (Column("best_val_acc", "best val acc %", "acc"), Column("test_acc", "test acc %", "acc"))
COUNTS = (Column("n", "seeds", "int"), Column("not_completed", "not completed", "int"))


def run_status(runs: Sequence[Run], store_root: str = "") -> Table:
    rows = []
    for r in runs:
        timing = (r.record or {}).get("timing") or {}
        row = describe(r, []) if r.record else {"run": r.name}
        row.update({"dir": str(r.path.relative_to(store_root)) if store_root else str(r.path),
                    "run_id": r.run_id, "status": r.status,
                    "error": (r.error or "")[:300] or "—",
                    "steps": (final(r) or {}).get("step"), "total_s": num(timing.get("total_s"))})
        rows.append(row)
    cols = (Column("dir", "directory"), Column("run_id", "run id"), Column("status", "status"),
            Column("dataset", "dataset"), Column("method", "method"), Column("lr", "lr", "lr"),
            SEED, Column("steps", "steps", "int"), Column("total_s", "time s", "num"),
            Column("error", "error"))
    return make_table("runs", "All runs",
                      "Every run directory in the store with its status. Only completed runs "
                      "enter the result tables; failed, diverged, running (or dead), corrupt and "
                      "missing runs are listed here with the reason.", cols, rows,
                      "the store holds no run directories")


def main_comparison(runs: Sequence[Run]) -> Table:
    done, keys = completed(runs), extra_keys(runs)
    tasks = zs_tasks(done)
    rows = []
    for r in done:
        row = describe(r, keys)
        row.update({"best_val_acc": num(final(r).get("best_val_acc")),
                    "test_acc": num(final(r).get("test_acc"))})
        row.update({f"d_{m}": delta(r, m) for m in core_metrics()})
        row.update({f"zs_{t}": zs(r, t) for t in tasks})
        rows.append(row)
    cols = (RUN, *DESCRIBE, SEED, *ACC, *metric_columns(), *zs_columns(tasks))
    return make_table("main_comparison", "Main comparison",
                      "One row per completed run: task accuracy (best validation epoch; test "
                      "read once at the end), drift of the layer-mean metrics vs the pretrained "
                      "model, 100 (adapted - pretrained) / pretrained, and zero-shot accuracy "
                      "after adaptation per transfer task.", cols, sorted(rows, key=order),
                      "no completed runs")


def baseline_structure(runs: Sequence[Run]) -> Table:
    seen, rows = set(), []
    for r in completed(runs):
        cfg = r.config
        key = (cfg.get("model"), (cfg.get("data") or {}).get("dataset"),
               repr(cfg.get("probe")))
        base = (r.record or {}).get("baseline") or {}
        if key in seen or not base:
            continue
        seen.add(key)
        n_layers = len((base.get("entropy") or {}).get("layers") or [])
        for i in range(n_layers):
            row = {"model": key[0], "dataset": key[1], "layer": i + 1}
            for m in core_metrics():
                layers = (base.get(m) or {}).get("layers") or []
                row[m] = num(layers[i]) if i < len(layers) else None
            rows.append(row)
    info = metric_info()
    cols = (Column("model", "model"), Column("dataset", "probe images from"),
            Column("layer", "layer", "int"),
            *(Column(m, f"{info[m].label} ({info[m].unit})" if info[m].unit else info[m].label,
                     "num") for m in core_metrics()))
    return make_table("baseline_structure", "Pretrained attention structure per layer",
                      "The pretrained model's CLS→patch metrics per layer on each probe set "
                      "(means over probe images and heads). "
                      + "; ".join(f"{v.label}: {v.meaning}" for v in info.values()) + ".",
                      cols, rows, "no completed run has a baseline")


def _setting_rows(groups: list[list[Run]], keys: Sequence[str], tasks: Sequence[str]) -> list:
    rows = []
    for g in groups:
        row = describe(g[0], keys)
        row.pop("seed"), row.pop("run")
        row.update(aggregate(g, tasks))
        rows.append(row)
    return sorted(rows, key=order)


def lr_sweep(runs: Sequence[Run]) -> Table:
    keys, tasks = extra_keys(runs), zs_tasks(completed(runs))
    by_rest: dict[tuple, list[list[Run]]] = {}
    for g in settings(runs):
        rest = tuple(kv for kv in setting_key(g[0].config) if kv[0] != "train.lr")
        by_rest.setdefault(rest, []).append(g)
    groups = [g for sweep in by_rest.values()
              if len({lr_of(g[0].config) for g in sweep if completed(g)}) >= 2
              for g in sweep]
    cols = (*DESCRIBE, *COUNTS, ACC[0], *metric_columns(), *zs_columns(tasks))
    return make_table("lr_sweep", "Learning-rate sweep",
                      "Settings that differ only in the learning rate, means over completed "
                      "seeds (spread in the matched-LR table). The trend test (exact "
                      "permutation correlation of log10 lr with Δ entropy) is in the corrected "
                      "inference table.", cols, _setting_rows(groups, keys, tasks),
                      "no setting was run at two or more learning rates")


def matched_lr(runs: Sequence[Run]) -> Table:
    keys, tasks = extra_keys(runs), zs_tasks(completed(runs))
    groups = settings(runs)
    cols = (*DESCRIBE, *COUNTS, Column("best_val_acc", "best val acc %", "acc", "best_val_acc_sd"),
            *metric_columns(with_sd=True), *zs_columns(tasks, with_sd=True))
    return make_table("matched_lr", "Matched-LR aggregate: mean ± sd over seeds",
                      "One row per setting (dataset × method × lr × other settings): mean ± sd "
                      "over its completed seeds (sd needs two seeds). 'not completed' counts the "
                      "setting's failed, diverged or unfinished runs (a setting with none "
                      "completed has no values).", cols,
                      _setting_rows(groups, keys, tasks), "no completed runs")


def _regularization_family(family: list[list[Run]]) -> bool:
    """Settings equal but for regularizer and weight decay, at least one of which varies."""
    decays = {repr((g[0].config.get("train") or {}).get("weight_decay")) for g in family}
    return len(family) > 1 and (len(decays) > 1 or any(
        regularizer_label(g[0].config) != "none" for g in family))


def regularization(runs: Sequence[Run]) -> Table:
    keys, tasks = extra_keys(runs), zs_tasks(completed(runs))
    by_rest: dict[tuple, list[list[Run]]] = {}
    for g in settings(runs):
        rest = tuple(kv for kv in setting_key(g[0].config)
                     if not kv[0].startswith("regularizer.") and kv[0] != "train.weight_decay")
        by_rest.setdefault(rest, []).append(g)
    groups = [g for family in by_rest.values() if _regularization_family(family)
              for g in family if completed(g)]
    cols = (*DESCRIBE, *COUNTS, ACC[0], *metric_columns(), *zs_columns(tasks))
    return make_table("regularization", "Regularization",
                      "Regularizers (APR, entropy floor, L2-SP) and weight-decay variants next "
                      "to the unregularized run of the same dataset, method and lr; means over "
                      "completed seeds. Tests vs the unregularized setting, Holm-adjusted across "
                      "the family, are in the corrected inference table.", cols,
                      _setting_rows(groups, keys, tasks),
                      "no regularized or weight-decay variant next to an unregularized run")


def zeroshot(runs: Sequence[Run]) -> Table:
    keys, rows = extra_keys(runs), []
    for r in completed(runs):
        for task in sorted((r.record or {}).get("zeroshot") or {}):
            row = describe(r, keys)
            row.update({"task": task, "before": zs(r, task, "before"), "after": zs(r, task),
                        "retention_pct": zs(r, task, "retention_pct"),
                        "chance": zs(r, task, "chance"), "d_entropy": delta(r, "entropy")})
            rows.append(row)
    cols = (RUN, *DESCRIBE, SEED, Column("task", "transfer task"),
            Column("before", "pretrained %", "acc"), Column("after", "adapted %", "acc"),
            Column("retention_pct", "retained %", "pct0"), Column("chance", "chance %", "acc"),
            Column("d_entropy", "Δ entropy %", "pct"))
    return make_table("zeroshot", "Zero-shot transfer",
                      "Zero-shot accuracy through the adapted image encoder (LoRA active) with "
                      "the frozen text tower, before and after adaptation; retained = after / "
                      "before.", cols, sorted(rows, key=lambda r: (r["task"], order(r))),
                      "no completed run evaluated zero-shot transfer")


def per_layer_delta(runs: Sequence[Run]) -> Table:
    keys, rows, width = extra_keys(runs), [], 0
    for r in completed(runs):
        layers = final(r).get("delta_pct_layers") or {}
        for m in core_metrics():
            values = layers.get(m) or []
            width = max(width, len(values))
            row = describe(r, keys)
            row.update({"metric": SHORT.get(m, m)})
            row.update({f"L{i + 1}": num(v) for i, v in enumerate(values)})
            rows.append(row)
    rank = {SHORT.get(m, m): i for i, m in enumerate(core_metrics())}  # metrics in their order
    cols = (RUN, *DESCRIBE, SEED, Column("metric", "metric"),
            *(Column(f"L{i + 1}", f"L{i + 1}", "pct") for i in range(width)))
    return make_table("per_layer_delta", "Per-layer drift (%)",
                      "Drift of each layer's metric vs the pretrained model (layer 1 = nearest "
                      "the input). Descriptive: layers of one model are not independent "
                      "samples.", cols, sorted(rows, key=lambda r: (order(r), rank[r["metric"]])),
                      "no completed runs")
