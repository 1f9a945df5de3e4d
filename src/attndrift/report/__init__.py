"""The report: figures (matplotlib) and HTML/Markdown rendering of the analysis of a run store.

`build_report(store, out_dir)` is the entry point behind ``attndrift report``. Importing this
package loads matplotlib but no model code.
"""

from attndrift.report.build import FIGURES, ReportResult, build_report

__all__ = ["FIGURES", "ReportResult", "build_report"]
