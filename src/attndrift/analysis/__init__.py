"""Analysis of run records: load a store, build the study's tables, run its statistics.

Reads records only (no model code, no torch), so it runs anywhere the records are.
``all_tables`` returns every table in report order, empty ones carrying why they were skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from attndrift.analysis import (
    associations,
    comparisons,
    forecast,
    forgetting,
    frontier,
    inference,
    predictors,
    robustness,
    supplementary,
    tables,
)
from attndrift.analysis.common import SUBSET0, SUBSET_MEAN, converged, resolve_drift
from attndrift.analysis.runs import Run, discover_run_dirs, load_run, load_store
from attndrift.analysis.table import Column, Table, to_markdown, write_csv

__all__ = ["SECTIONS", "SUBSET0", "SUBSET_MEAN", "TABLES", "Column", "Run", "Table", "all_tables",
           "converged", "discover_run_dirs", "load_run", "load_store", "resolve_drift",
           "to_markdown", "write_csv"]

# Report order. Each builder: (runs, drift=SUBSET_MEAN) -> Table.
TABLES: tuple[Callable[..., Table], ...] = (
    tables.main_comparison,
    tables.baseline_summary,
    tables.baseline_structure,
    tables.absolute_metrics,
    tables.lr_sweep,
    tables.matched_lr,
    supplementary.convergence,
    supplementary.grid_aggregate,
    comparisons.bootstrap_cis,
    comparisons.backbone_comparison,
    tables.regularization,
    supplementary.auxiliary,
    tables.zeroshot,
    robustness.robustness,
    tables.per_layer_delta,
    supplementary.collapse_onsets,
    forgetting.forgetting_dynamics, forgetting.early_drift_vs_retention,
    predictors.predictors, frontier.selection_utility, frontier.frontier,
    forecast.forecast_table, frontier.guarded_runs,
    inference.run_level,
    inference.method_lr_contrasts,
    inference.corrected_inference,
    associations.transfer_retention,
    associations.cka_correlation,
    associations.metric_correlations,
    supplementary.provenance,
)


# Where each table belongs in a report, in reading order (every table of `all_tables` is in
# exactly one section; tests/test_tables.py checks it). The report renders these sections.
SECTIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("runs", "Run status", ("runs", "convergence")),
    ("results", "Results", ("matched_lr", "main_comparison", "baseline_summary",
                            "baseline_structure", "absolute_metrics", "lr_sweep",
                            "grid_aggregate", "backbone_comparison", "regularization",
                            "auxiliary", "zeroshot", "robustness", "per_layer_delta",
                            "collapse_onset")),
    ("statistics", "Statistics", ("bootstrap_ci", "run_level", "method_lr_contrasts",
                                  "inference", "transfer_retention", "cka_correlation",
                                  "metric_correlations")),
    ("forgetting", "Forgetting during training", ("forgetting_dynamics",
                                                  "early_drift_vs_retention")),
    ("predictors", "Which signal predicts forgetting", ("predictors", "selection_utility",
                                                        "frontier", "forecast",
                                                        "guarded_runs")),
    ("provenance", "Provenance", ("provenance",)),
)


def all_tables(runs: Sequence[Run], store_root: str = "", drift: str = SUBSET_MEAN
               ) -> list[Table]:
    """The run-status table, then every table of `TABLES`, drift read as ``drift``
    (`SUBSET_MEAN`: the mean over the fixed probe subsets, as 002; `SUBSET0`: the first
    subset; a store without subset means is read on subset 0, see `resolve_drift`). A builder
    that fails on odd records yields an empty table naming the error, so one bad record cannot
    stop a report."""
    drift = resolve_drift(runs, drift)
    out = [tables.run_status(runs, store_root)]
    for build in TABLES:
        try:
            out.append(build(runs, drift=drift))
        except Exception as err:  # reported in the table's place, not raised
            name = build.__name__
            out.append(Table(name, name.replace("_", " ").capitalize(), "", (),
                             skipped=f"error while building: {type(err).__name__}: {err}"))
    return out
