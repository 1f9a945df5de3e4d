"""What the report shows where (issue 22 item 4): the answer first, details below.

The first screen is the summary: run counts, the verdict per backbone × dataset (which method
keeps the most transfer, at what accuracy, the statistic behind it and its caveats), the
registered summary slots (e.g. which signal warned early), then the summary section's figures
(the dashboard, accuracy against retention). Every other section of `analysis.table.SECTIONS`
follows folded (``<details>``), holding its registered tables and figures; a table of contents
links them all. This module builds the context the templates read; `render` turns it into text.
"""

from __future__ import annotations

import base64
import datetime as _dt
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attndrift
from attndrift.analysis.common import completed, resolve_drift
from attndrift.analysis.runs import Run, dataset_of, lr_of
from attndrift.analysis.table import SECTIONS, SUMMARY_SLOTS, Table, summary_specs, table_specs
from attndrift.report.base import FigureOut, series_label
from attndrift.report.render import glance, provenance_rows, table_ctx
from attndrift.report.style import model_name

STATUS_ORDER = ("completed", "diverged", "failed", "running", "corrupt", "missing")


def summary_slots(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Each first-screen slot with its sentences from the functions registered for it, or its
    placeholder; a function that fails says so in its slot instead of stopping the report."""
    drift = resolve_drift(runs)
    lines: dict[str, list[str]] = {slot: [] for slot in SUMMARY_SLOTS}
    for spec in summary_specs():
        try:
            lines[spec.slot] += [str(x) for x in spec.build(runs, drift=drift)]
        except Exception as err:
            lines[spec.slot].append(f"error while computing: {type(err).__name__}: {err}")
    return [{"id": slot, "title": title, "lines": lines[slot], "placeholder": placeholder}
            for slot, (title, placeholder) in SUMMARY_SLOTS.items()]


def _figure_ctx(f: FigureOut, number: int, tables: dict[str, Table]) -> dict[str, Any]:
    refs = []
    for name in f.tables:
        t = tables.get(name)
        if t is None:
            continue
        refs.append({"name": name, "title": t.title, "shown": not t.empty, "why": t.skipped})
    return {"name": f.name, "title": f.title, "caption": f.caption, "number": number,
            "path": f"figures/{f.name}.png", "refs": refs,
            "uri": "data:image/png;base64," + base64.b64encode(f.png or b"").decode()}


def _sections(tables: Sequence[Table], figures: Sequence[FigureOut]) -> list[dict[str, Any]]:
    by_name = {t.name: t for t in tables}
    specs = table_specs()
    number = 0
    out = []
    for sec in SECTIONS:
        shown = [table_ctx(by_name[s.name], s.fold) for s in specs
                 if s.section == sec.id and s.name in by_name and not by_name[s.name].empty]
        figs = []
        for f in figures:
            if f.section == sec.id and f.png is not None:
                number += 1
                figs.append(_figure_ctx(f, number, by_name))
        out.append({"id": sec.id, "title": sec.title, "intro": sec.intro, "open": sec.open,
                    "tables": shown, "figures": figs})
    return out


def _sorted_seeds(done: Sequence[Run]) -> list[Any]:
    return sorted({r.config.get("seed") for r in done},
                  key=lambda v: (not isinstance(v, int), v if isinstance(v, int) else 0, str(v)))


def report_context(runs: Sequence[Run], tables: Sequence[Table], figures: Sequence[FigureOut],
                   store: Path) -> dict[str, Any]:
    counts = Counter(r.status for r in runs)
    skipped = [{"kind": "table", "name": t.name, "title": t.title, "why": t.skipped}
               for t in tables if t.empty]
    skipped += [{"kind": "figure", "name": f.name, "title": f.title, "why": f.skipped}
                for f in figures if f.png is None]
    done = completed(runs)
    sections = _sections(tables, figures)
    return {
        "title": f"attndrift report: {store.name or store}",
        "generated": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "store": str(store),
        "version": attndrift.__version__,
        "n_runs": len(runs),
        "counts": [(s, counts[s]) for s in STATUS_ORDER if counts[s]]
        + [(s, n) for s, n in counts.items() if s not in STATUS_ORDER],
        "backbones": sorted({model_name(r.config) for r in done}, key=str.casefold),
        "datasets": sorted({dataset_of(r.config) for r in done}, key=str.casefold),
        "methods": sorted({series_label(r) for r in done}, key=str.casefold),
        "lrs": sorted({lr_of(r.config) for r in done}),
        "seeds": _sorted_seeds(done),
        "slots": summary_slots(runs),
        "glance": glance(runs),
        "summary": sections[0],
        "sections": sections[1:],
        "skipped": skipped,
        "provenance": provenance_rows(runs),
    }
