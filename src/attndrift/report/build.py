"""``attndrift report STORE --out DIR``: records -> tables + statistics + figures -> report.

Writes ``DIR/report.html`` (self-contained: figures embedded as base64 PNG, inline CSS, opens
offline), ``DIR/report.md`` (figures as ``figures/*.png``), ``DIR/tables/*.csv`` (one per table
that has rows) and ``DIR/figures/*.png``. Reads run records and attention maps only: no model
code, no torch. Tables and figures register themselves where they are built
(`analysis.table.register_table`, `report.base.register_figure`); this module draws and writes
whatever is registered.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attndrift.analysis import Run, Table, all_tables, load_store, resolve_drift, write_csv
from attndrift.analysis.predictors import EARLY_FRACTION, reading_early_at
from attndrift.report.base import DPI, FigureOut, NoData, figure_specs
from attndrift.report.layout import report_context
from attndrift.report.publish import staged, write_file
from attndrift.report.render import render_html, render_markdown


@dataclass(frozen=True)
class ReportResult:
    html: Path
    markdown: Path
    counts: dict[str, int]
    tables: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def draw_figures(runs: Sequence[Run]) -> list[FigureOut]:
    """Every registered figure (`base.figure_specs`), drawn, or the reason it could not be."""
    out = []
    drift = resolve_drift(runs)
    for spec in figure_specs():
        caption = spec.caption_for(drift)
        where = {"section": spec.section, "tables": spec.tables}
        try:
            fig = spec.draw(runs)
        except NoData as why:
            out.append(FigureOut(spec.name, spec.title, caption, None, str(why), **where))
            continue
        except Exception as err:  # one figure's bug must not cost the whole report
            why = f"error while drawing: {type(err).__name__}: {err}"
            out.append(FigureOut(spec.name, spec.title, caption, None, why, **where))
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        out.append(FigureOut(spec.name, spec.title, caption, buf.getvalue(), **where))
    return out


def build_report(store: Path, out_dir: Path, early_fraction: float = EARLY_FRACTION
                 ) -> ReportResult:
    """Read every run under ``store`` and write the report to ``out_dir``; the predictor
    analysis reads its early point at ``early_fraction`` of training (besides epoch 1)."""
    t0 = time.perf_counter()
    store, out_dir = Path(store), Path(out_dir)
    runs = load_store(store)
    with reading_early_at(early_fraction):
        tables: list[Table] = all_tables(runs, str(store))
        figs = draw_figures(runs)
        ctx = report_context(runs, tables, figs, store)
    html, md = out_dir / "report.html", out_dir / "report.md"
    with staged(out_dir) as stage:
        (stage / "tables").mkdir()
        (stage / "figures").mkdir()
        for t in tables:
            if not t.empty or t.name == "runs":  # the run list is written even for an empty store
                path = stage / "tables" / f"{t.name}.csv"
                try:
                    write_csv(t, path)
                except OSError as err:
                    raise OSError(err.errno, err.strerror, str(err.filename or path)) from err
        for f in figs:
            if f.png is not None:
                write_file(stage / "figures" / f"{f.name}.png", f.png)
        write_file(stage / md.name, render_markdown(ctx))
        write_file(stage / html.name, render_html(ctx))
    counts = dict(Counter(r.status for r in runs))
    return ReportResult(
        html,
        md,
        counts,
        [t.name for t in tables if not t.empty or t.name == "runs"],
        [f.name for f in figs if f.png is not None],
        time.perf_counter() - t0,
    )
