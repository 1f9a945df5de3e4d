"""The report: figures (matplotlib) and HTML/Markdown rendering of the analysis of a run store.

`build_report(store, out_dir)` is the entry point behind ``attndrift report``. Importing this
package loads matplotlib but no model code. `FIGURES` lists every registered figure in report
order (`base.figure_specs()`).
"""

from attndrift.report.base import FigureSpec, figure_specs, register_figure
from attndrift.report.build import ReportResult, build_report

FIGURES: tuple[FigureSpec, ...] = figure_specs()

__all__ = ["FIGURES", "FigureSpec", "ReportResult", "build_report", "figure_specs",
           "register_figure"]
