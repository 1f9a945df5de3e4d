"""The `Table` type every analysis table returns, and its CSV / Markdown / display forms.

A table is data: rows of raw values (fractions, percentages, p-values as floats) keyed by
column, plus how each column reads. CSV keeps the raw values; Markdown and HTML show formatted
strings, a missing value as "n/a" (not available). A table with no rows carries ``skipped``, the
reason it does not apply to a store.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attndrift.analysis.runs import short_number


@dataclass(frozen=True)
class Column:
    """``fmt``: str | int | acc (fraction shown as %) | pct (signed %) | pct0 (plain %) |
    num (4 significant digits) | f2 / f4 (2 / 4 decimals) | lr | p (p-value). ``sd``: key of a
    spread shown as ``± sd``."""

    key: str
    label: str
    fmt: str = "str"
    sd: str | None = None


@dataclass(frozen=True)
class Table:
    name: str  # file stem under tables/
    title: str
    caption: str  # what it shows and how to read it
    columns: tuple[Column, ...]
    rows: tuple[dict[str, Any], ...] = ()
    skipped: str | None = None  # why there are no rows
    notes: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not self.rows

    def to_pandas(self) -> Any:
        """The table as a `pandas.DataFrame` of raw values, one column per CSV column (a
        missing value is NaN / None); ``df.attrs`` holds the title, caption, column labels and
        why an empty table was skipped."""
        import pandas as pd

        keys = csv_columns(self)
        df = pd.DataFrame([[None if _missing(r.get(k)) else r.get(k) for k in keys]
                           for r in self.rows], columns=keys)
        df.attrs.update(name=self.name, title=self.title, caption=self.caption,
                        labels={c.key: c.label for c in self.columns}, skipped=self.skipped)
        return df


# How a missing value (not recorded, or undefined such as the sd of one seed) reads.
NOT_AVAILABLE = "n/a"

# Descriptive columns left out when every row has the default: no "other settings" column when
# nothing else varies, no "regularizer" column when no run used one.
OPTIONAL = {"other": "—", "regularizer": "none"}


def make_table(name: str, title: str, caption: str, columns: Sequence[Column],
               rows: Sequence[dict[str, Any]], skipped: str,
               notes: Sequence[str] = ()) -> Table:
    """A `Table`; ``skipped`` is kept only when there are no rows."""
    columns = [c for c in columns if c.key not in OPTIONAL or any(
        r.get(c.key, OPTIONAL[c.key]) != OPTIONAL[c.key] for r in rows)]
    return Table(name, title, caption, tuple(columns), tuple(rows),
                 None if rows else skipped, tuple(notes))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def format_value(value: Any, fmt: str) -> str:
    if isinstance(value, str):
        return value
    if _missing(value):
        return NOT_AVAILABLE
    if fmt == "acc":
        return f"{100 * value:.2f}"
    if fmt == "pct":
        return f"{value:+.2f}"
    if fmt == "pct0":
        return f"{value:.1f}"
    if fmt == "num":
        return f"{value:.4g}"
    if fmt == "f2":
        return f"{value:.2f}"
    if fmt == "f4":
        return f"{value:.4f}"
    if fmt == "lr":
        return short_number(value)
    if fmt == "p":
        return "<0.0001" if value < 1e-4 else f"{value:.4f}"
    if fmt == "int":
        return f"{int(value)}"
    return str(value)


def cell(row: dict[str, Any], col: Column) -> str:
    text = format_value(row.get(col.key), col.fmt)
    if col.sd is not None and not _missing(row.get(col.key)) and not _missing(row.get(col.sd)):
        # the spread in the mean's units and decimals, unsigned
        text += " ± " + format_value(abs(row[col.sd]), "pct0" if col.fmt == "pct0" else
                                     col.fmt).lstrip("+")
    return text


def display(table: Table) -> tuple[list[str], list[list[str]]]:
    """Header labels and formatted cells."""
    return ([c.label for c in table.columns],
            [[cell(r, c) for c in table.columns] for r in table.rows])


def csv_columns(table: Table) -> list[str]:
    keys: list[str] = []
    for c in table.columns:
        keys.append(c.key)
        if c.sd:
            keys.append(c.sd)
    return keys


def write_csv(table: Table, path: Path) -> None:
    """Raw values, one column per key (spreads get their own column); missing = empty."""
    keys = csv_columns(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(keys)
        for row in table.rows:
            writer.writerow(["" if _missing(row.get(k)) else row.get(k) for k in keys])


def to_markdown(table: Table) -> str:
    headers, rows = display(table)

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
