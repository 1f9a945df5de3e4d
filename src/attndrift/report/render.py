"""Rendering: a table as the cells the templates show, the "every family at its best lr" summary,
provenance, Markdown escaping, and the HTML / Markdown text from the context `layout` builds
(jinja2 templates in ``templates/``)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jinja2
import numpy as np

from attndrift.analysis.common import completed, converged, final, num, zs, zs_tasks
from attndrift.analysis.runs import Run
from attndrift.analysis.table import Table, display, to_markdown
from attndrift.report.style import drift_reader, panel_title, series_of
from attndrift.report.summary import best_lr

COLLAPSE_ROWS = 24  # longer tables fold into <details> in the HTML


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


def table_ctx(t: Table, fold: Sequence[str] = ()) -> dict[str, Any]:
    """``fold``: rows equal but for these columns become one line listing the runs it covers
    (the per-run provenance of a one-machine study is one line; `register_table(fold=...)`)."""
    headers, rows = display(t)
    status = [r.get("status", "") for r in t.rows]
    if fold:
        rows, status = _fold_repeats(headers, rows, status, t.columns, fold)
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
    "means over that setting's completed seeds. Seeds whose last three epochs of validation "
    "accuracy vary by sd ≥ 0.005 (not converged, 003 §4.5), test accuracy %, drift of the "
    "layer-mean CLS→patch entropy vs the pretrained model % (mean over the fixed probe "
    "subsets, 002), and the share of pretrained zero-shot accuracy retained %."
)


def glance(runs: Sequence[Run]) -> dict[str, Any]:
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
                    [head, s.label, "—", f"0 / {len(s.runs)}", "—", "—", "—",
                     *("—" for _ in tasks)]
                )
                continue
            lr, ok = best_lr(s)
            n_all = len(s.by_lr()[lr])
            row = [
                head,
                s.label,
                f"{lr:g}" if math.isfinite(lr) else "—",  # a measured checkpoint may have none
                f"{len(ok)} / {n_all}",
                _not_converged(ok),
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
        "not converged",
        "test acc %",
        "Δ entropy %",
        *(f"retained {t} %" for t in tasks),
    ]
    return {"headers": headers, "rows": rows, "caption": GLANCE_CAPTION}


def _not_converged(runs: Sequence[Run]) -> str:
    """How many seeds fail the late-epoch check (003 §4.5); "—" when none can be checked."""
    flags = [converged(r) for r in runs]
    return "—" if all(f is None for f in flags) else str(sum(f is False for f in flags))


def _mean(values: Sequence[float], fmt: str) -> str:
    vals = [v for v in values if math.isfinite(v)]
    return fmt.format(float(np.mean(vals))) if vals else "—"


def provenance_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
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
