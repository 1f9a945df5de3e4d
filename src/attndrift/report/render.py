"""Rendering: tables, figures and run summaries -> the context the report templates read, and
the HTML / Markdown text (jinja2 templates in ``templates/``)."""

from __future__ import annotations

import base64
import datetime as _dt
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np

import attndrift
from attndrift.analysis import SECTIONS as ANALYSIS_SECTIONS
from attndrift.analysis.common import completed, final, num, zs, zs_tasks
from attndrift.analysis.runs import Run, dataset_of, lr_of
from attndrift.analysis.table import Table, display, to_markdown
from attndrift.report.figures import series_label
from attndrift.report.style import drift_reader, model_name, panel_title, series_of
from attndrift.report.summary import best_lr

if TYPE_CHECKING:
    from attndrift.report.build import FigureOut

STATUS_ORDER = ("completed", "diverged", "failed", "running", "corrupt", "missing")
# Which table goes in which section, in reading order: analysis owns the list (one place).
SECTIONS = ANALYSIS_SECTIONS
COLLAPSE_ROWS = 24  # longer tables fold into <details> in the HTML
STATISTICS_INTRO = (
    "Inference is run-level: seeds are the units, so a method contrast needs two or more "
    "completed seeds per setting. The learning-rate trend uses the seed mean at each learning "
    "rate as one point and an exact permutation test (all n! pairings for n ≤ 8, else 50,000 "
    "seeded random pairings); its two-sided p is the share of pairings with |r| at least the "
    "observed |r|, the observed pairing included. Tests that treat the layers of one model as "
    "samples (the original study's per-layer t tests and layer-position ANOVA) are labelled "
    "exploratory: layers of one model are not independent, so their p-values are descriptive. "
    "Holm-Bonferroni adjusts p-values within each family of comparisons; Cohen's d uses the "
    "pooled sd."
)


# Tables whose rows repeat but for the named columns: identical rows fold into one line that
# lists the runs it covers (the per-run provenance of a one-machine study is one line).
FOLD_REPEATS = {"provenance": ("run", "status")}


def _fold_repeats(
    headers: list[str],
    rows: list[list[str]],
    status: list[str],
    columns: Sequence[Any],
    keys: Sequence[str],
) -> tuple[list, list]:
    idx = [i for i, c in enumerate(columns) if c.key in keys]
    first = idx[0] if idx else 0
    groups: dict[tuple, list[int]] = {}
    for k, row in enumerate(rows):
        groups.setdefault(tuple(c for i, c in enumerate(row) if i not in idx), []).append(k)
    out_rows, out_status = [], []
    for members in groups.values():
        row = list(rows[members[0]])
        if len(members) > 1:
            names = [rows[k][first] for k in members]
            shown = ", ".join(names[:3]) + (f", … {len(names) - 3} more" if len(names) > 3 else "")
            row[first] = f"{len(members)} runs ({shown})"
            for i in idx[1:]:
                row[i] = ", ".join(sorted({rows[k][i] for k in members}))
        out_rows.append(row)
        out_status.append(status[members[0]] if len({status[k] for k in members}) == 1 else "")
    return out_rows, out_status


def _table_ctx(t: Table) -> dict[str, Any]:
    headers, rows = display(t)
    status = [r.get("status", "") for r in t.rows]
    if t.name in FOLD_REPEATS:
        rows, status = _fold_repeats(headers, rows, status, t.columns, FOLD_REPEATS[t.name])
    return {
        "name": t.name,
        "title": t.title,
        "caption": t.caption,
        "headers": headers,
        "align": ["l" if c.fmt == "str" else "r" for c in t.columns],
        "rows": list(zip(status, rows, strict=True)),
        "n": len(rows),
        "collapsed": len(rows) > COLLAPSE_ROWS,
        "markdown": to_markdown(t),
        "csv": f"tables/{t.name}.csv",
        "notes": list(t.notes),
    }


GLANCE_CAPTION = (
    "Like with like: each setting family (everything but the seed and the learning rate) at "
    "its best learning rate, chosen by mean best validation accuracy (never the test split); "
    "means over that setting's completed seeds. Test accuracy %, drift of the layer-mean "
    "CLS→patch entropy vs the pretrained model % (mean over the fixed probe subsets, 002), "
    "and the share of pretrained zero-shot accuracy retained %."
)


def _glance(runs: Sequence[Run]) -> dict[str, Any]:
    """Per backbone × dataset × setting family, at the family's best lr: seeds, test accuracy,
    mean Δ entropy, mean zero-shot retention per task (one format per column)."""
    delta = drift_reader(runs)
    done = completed(runs)
    tasks = zs_tasks(done)
    panels = series_of([r for r in runs if r.record is not None])
    rows = []
    for panel, fams in panels.items():
        head = panel_title(panel, panels) or panel[1]
        for s in fams:
            if not completed(s.runs):
                rows.append(
                    [head, s.label, "—", f"0 / {len(s.runs)}", "—", "—", *("—" for _ in tasks)]
                )
                continue
            lr, ok = best_lr(s)
            n_all = len(s.by_lr()[lr])
            row = [
                head,
                s.label,
                f"{lr:g}",
                f"{len(ok)} / {n_all}",
                _mean([100 * num(final(r).get("test_acc")) for r in ok], "{:.1f}"),
                _mean([delta(r, "entropy") for r in ok], "{:+.2f}"),
            ]
            row += [_mean([zs(r, t, "retention_pct") for r in ok], "{:.1f}") for t in tasks]
            rows.append(row)
    headers = [
        "backbone · dataset" if len({p[0] for p in panels}) > 1 else "dataset",
        "setting",
        "best lr",
        "completed / runs",
        "test acc %",
        "Δ entropy %",
        *(f"retained {t} %" for t in tasks),
    ]
    return {"headers": headers, "rows": rows, "caption": GLANCE_CAPTION}


def _mean(values: Sequence[float], fmt: str) -> str:
    vals = [v for v in values if math.isfinite(v)]
    return fmt.format(float(np.mean(vals))) if vals else "—"


def _provenance(runs: Sequence[Run]) -> list[dict[str, Any]]:
    keys = ("attndrift", "python", "torch", "transformers", "peft", "device", "gpu", "platform")
    combos: Counter = Counter()
    commits: dict[tuple, set] = {}
    for r in runs:
        prov = (r.record or {}).get("provenance") or {}
        if prov:
            key = tuple(str(prov.get(k) or "—") for k in keys)
            combos[key] += 1
            commits.setdefault(key, set()).add(str(prov.get("git_commit") or "—")[:12])
    return [
        {
            **dict(zip(keys, key, strict=True)),
            "runs": n,
            "git_commit": ", ".join(sorted(commits[key])),
        }
        for key, n in combos.most_common()
    ]


def report_context(
    runs: Sequence[Run], tables: Sequence[Table], figures: Sequence[FigureOut], store: Path
) -> dict[str, Any]:
    by_name = {t.name: t for t in tables}
    counts = Counter(r.status for r in runs)
    sections = []
    for sid, title, names in SECTIONS:
        present = [_table_ctx(by_name[n]) for n in names if n in by_name and not by_name[n].empty]
        sections.append({"id": sid, "title": title, "tables": present})
    skipped = [{"kind": "table", "title": t.title, "why": t.skipped} for t in tables if t.empty]
    skipped += [
        {"kind": "figure", "title": f.title, "why": f.skipped} for f in figures if f.png is None
    ]
    done = completed(runs)
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
        "seeds": sorted(
            {r.config.get("seed") for r in done},
            key=lambda v: (not isinstance(v, int), v if isinstance(v, int) else 0, str(v)),
        ),
        "glance": _glance(runs),
        "sections": sections,
        "figures": [
            {
                "name": f.name,
                "title": f.title,
                "caption": f.caption,
                "path": f"figures/{f.name}.png",
                "uri": "data:image/png;base64," + base64.b64encode(f.png).decode(),
            }
            for f in figures
            if f.png is not None
        ],
        "skipped": skipped,
        "statistics_intro": STATISTICS_INTRO,
        "provenance": _provenance(runs),
    }


def md_escape(value: Any) -> str:
    """A run name or config string as Markdown text: no raw HTML, links, code spans or table
    cell breaks (emphasis characters are left: they only change the look)."""
    text = str(value).replace("\r", " ").replace("\n", " ")
    for ch in "\\`[]<>|":
        text = text.replace(ch, "\\" + ch)
    return text


def md_no_html(markdown: str) -> str:
    """Prebuilt Markdown (tables) with any raw HTML a run name carried made inert."""
    return markdown.replace("<", "&lt;").replace(">", "&gt;")


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("attndrift.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "html.j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(md=md_escape, md_no_html=md_no_html)
    return env


def render_html(ctx: dict[str, Any]) -> str:
    return _env().get_template("report.html.j2").render(**ctx)


def render_markdown(ctx: dict[str, Any]) -> str:
    return _env().get_template("report.md.j2").render(**ctx)
