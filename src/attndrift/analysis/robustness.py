"""Robustness to corrupted test splits (`data.robustness`; the later protocol's corruption
table): per run, clean test accuracy, accuracy on each corrupted split, their mean and the
gap clean - mean. Records only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attndrift.analysis.common import (
    DESCRIBE,
    SUBSET_MEAN,
    completed,
    context,
    describe,
    num,
    order,
)
from attndrift.analysis.runs import Run
from attndrift.analysis.table import Column, Table, make_table, register_table


def _robustness(run: Run) -> dict[str, Any]:
    value = (run.record or {}).get("robustness")
    return value if isinstance(value, dict) else {}


@register_table("robustness", "results", order=115)
def robustness(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    """One row per completed run with a robustness entry; one column per corrupted split
    (published splits by name, generated ones as ``corruption@severity``)."""
    ctx, rows, splits = context(runs), [], []
    for r in completed(runs):
        rob = _robustness(r)
        accuracy = rob.get("accuracy") if isinstance(rob.get("accuracy"), dict) else {}
        if not accuracy:
            continue
        splits += [s for s in accuracy if s not in splits]
        row = describe(r, ctx)
        row.update({"test_acc": num(rob.get("test_acc")), "mean": num(rob.get("mean")),
                    "gap": num(rob.get("gap")),
                    **{f"acc:{s}": num(v) for s, v in accuracy.items()}})
        rows.append(row)
    cols = (Column("run", "run"), *DESCRIBE, Column("seed", "seed", "int"),
            Column("test_acc", "clean test %", "acc"),
            *(Column(f"acc:{s}", f"{s} %", "acc") for s in splits),
            Column("mean", "mean corrupted %", "acc"), Column("gap", "gap (points)", "acc"))
    return make_table("robustness", "Robustness to corruptions",
                      "Accuracy of the fine-tuned classifier on corrupted test splits "
                      "(published splits by name; generated ImageNet-C corruptions as "
                      "name@severity), each on the same class-balanced images for every run; "
                      "mean over the splits and the gap = clean test accuracy - mean "
                      "(the later protocol).", cols, sorted(rows, key=order),
                      "no completed run was scored on corrupted test splits "
                      "(data.robustness)")
