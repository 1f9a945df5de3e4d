"""Analysis of run records: load a store, build the study's tables, run its statistics.

Reads records only (no model code, no torch), so it runs anywhere the records are.
``all_tables`` returns every table in report order, empty ones carrying why they were skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from attndrift.analysis import forgetting, inference, supplementary, tables
from attndrift.analysis.runs import Run, discover_run_dirs, load_run, load_store
from attndrift.analysis.table import Column, Table, to_markdown, write_csv

__all__ = ["TABLES", "Column", "Run", "Table", "all_tables", "discover_run_dirs", "load_run",
           "load_store", "to_markdown", "write_csv"]

# Report order. Each builder: runs -> Table.
TABLES: tuple[Callable[[Sequence[Run]], Table], ...] = (
    tables.main_comparison,
    tables.baseline_structure,
    tables.lr_sweep,
    tables.matched_lr,
    supplementary.grid_aggregate,
    tables.regularization,
    supplementary.auxiliary,
    tables.zeroshot,
    tables.per_layer_delta,
    supplementary.collapse_onsets,
    forgetting.forgetting_dynamics, forgetting.early_drift_vs_retention,
    inference.run_level,
    inference.corrected_inference,
    inference.metric_correlations,
    supplementary.provenance,
)


def all_tables(runs: Sequence[Run], store_root: str = "") -> list[Table]:
    """The run-status table, then every table of `TABLES`. A builder that fails on odd
    records yields an empty table naming the error, so one bad record cannot stop a report."""
    out = [tables.run_status(runs, store_root)]
    for build in TABLES:
        try:
            out.append(build(runs))
        except Exception as err:  # reported in the table's place, not raised
            name = build.__name__
            out.append(Table(name, name.replace("_", " ").capitalize(), "", (),
                             skipped=f"error while building: {type(err).__name__}: {err}"))
    return out
