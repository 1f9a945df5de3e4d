"""Analysis of run records: load a store, build the study's tables, run its statistics.

Reads records only (no model code, no torch), so it runs anywhere the records are.
``all_tables`` returns every table in report order, empty ones carrying why they were skipped.
Tables register themselves where they are built (`register_table`, in `analysis.table`), with
the report section they belong to; every module of this package is imported on first use.
"""

from __future__ import annotations

from collections.abc import Sequence

from attndrift.analysis.common import SUBSET0, SUBSET_MEAN, converged, resolve_drift
from attndrift.analysis.runs import Run, discover_run_dirs, load_run, load_store
from attndrift.analysis.table import (
    SECTIONS,
    Column,
    Section,
    Table,
    TableSpec,
    register_table,
    table_specs,
    to_markdown,
    write_csv,
)

__all__ = ["SECTIONS", "SUBSET0", "SUBSET_MEAN", "Column", "Run", "Section", "Table", "TableSpec",
           "all_tables", "converged", "discover_run_dirs", "load_run", "load_store",
           "register_table", "resolve_drift", "table_specs", "to_markdown", "write_csv"]


def all_tables(runs: Sequence[Run], store_root: str = "", drift: str = SUBSET_MEAN
               ) -> list[Table]:
    """Every registered table (`table_specs`) in report order, drift read as ``drift``
    (`SUBSET_MEAN`: the mean over the fixed probe subsets, as 002; `SUBSET0`: the first
    subset; a store without subset means is read on subset 0, see `resolve_drift`). A builder
    that fails on odd records yields an empty table naming the error, so one bad record cannot
    stop a report."""
    drift = resolve_drift(runs, drift)
    out = []
    for spec in table_specs():
        try:
            extra = {"store_root": store_root} if spec.store else {}
            out.append(spec.build(runs, drift=drift, **extra))
        except Exception as err:  # reported in the table's place, not raised
            out.append(Table(spec.name, spec.name.replace("_", " ").capitalize(), "", (),
                             skipped=f"error while building: {type(err).__name__}: {err}"))
    return out
