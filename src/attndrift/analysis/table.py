"""The `Table` type every analysis table returns, and its CSV / Markdown / display forms.

A table is data: rows of raw values (fractions, percentages, p-values as floats) keyed by
column, plus how each column reads. CSV keeps the raw values; Markdown and HTML show formatted
strings, a missing value as "n/a" (not available). A table with no rows carries ``skipped``, the
reason it does not apply to a store.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
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


@dataclass(frozen=True)
class Section:
    """A part of the report; tables and figures name the section they belong to."""

    id: str
    title: str
    intro: str = ""
    open: bool = False  # shown unfolded (the summary); the others fold into <details>


# The report's sections in reading order: the answer first, details below.
SECTIONS: tuple[Section, ...] = (
    Section("summary", "Summary", open=True),
    Section("results", "Results"),
    Section("dynamics", "Over training"),
    Section("statistics", "Statistics", intro=(
        "Inference is run-level: seeds are the units, so a method contrast needs two or more "
        "completed seeds per setting. The learning-rate trend uses the seed mean at each "
        "learning rate as one point and an exact permutation test (all n! pairings for n ≤ 8, "
        "else 50,000 seeded random pairings); its two-sided p is the share of pairings with |r| "
        "at least the observed |r|, the observed pairing included. Tests that treat the layers "
        "of one model as samples (the original study's per-layer t tests and layer-position "
        "ANOVA) are labelled exploratory: layers of one model are not independent, so their "
        "p-values are descriptive. Holm-Bonferroni adjusts p-values within each family of "
        "comparisons; Cohen's d uses the pooled sd.")),
    Section("forgetting", "Forgetting during training"),
    Section("predictors", "Which signal predicts forgetting"),
    Section("interpolation", "Interpolation: pretrained to fine-tuned"),
    Section("runs", "Run status and convergence"),
    Section("provenance", "Provenance", intro=(
        "Software and devices the runs were made with (one row per combination).")),
)


@dataclass(frozen=True)
class TableSpec:
    """A registered table: its builder ``(runs, drift=...) -> Table`` (``store_root=`` too when
    ``store``), where the report shows it, and which columns may fold identical rows."""

    name: str
    section: str
    order: int
    build: Callable[..., Table]
    fold: tuple[str, ...] = ()  # rows equal but for these columns fold into one line
    store: bool = False


_TABLES: dict[str, TableSpec] = {}


def register_table(name: str, section: str, *, order: int = 100, fold: Sequence[str] = (),
                   store: bool = False) -> Callable[[Callable[..., Table]], Callable[..., Table]]:
    """Register the decorated builder as table ``name`` (its `Table.name`, the CSV stem) in
    report section ``section`` (one of `SECTIONS`) at place ``order`` within it."""
    if section not in {s.id for s in SECTIONS}:
        raise ValueError(f"table {name!r}: unknown section {section!r}")

    def add(build: Callable[..., Table]) -> Callable[..., Table]:
        old = _TABLES.get(name)
        if old is not None and old.build.__qualname__ != build.__qualname__:
            raise ValueError(f"table {name!r} is registered twice")
        _TABLES[name] = TableSpec(name, section, order, build, tuple(fold), store)
        return build

    return add


# Lines of the report's first screen, in order: a slot is filled by the functions registered
# for it (`register_summary`), or shows its placeholder (what would fill it).
SUMMARY_SLOTS: dict[str, tuple[str, str]] = {
    "verdict": ("Verdict", "no verdict could be computed"),
    "early_warning": ("Which signal warned early",
                      "not computed: no predictor analysis is registered for this slot"),
}


@dataclass(frozen=True)
class SummarySpec:
    """A function ``(runs, drift=...) -> list[str]`` giving sentences for slot ``slot``."""

    slot: str
    order: int
    build: Callable[..., list[str]]


_SUMMARIES: dict[str, SummarySpec] = {}


def register_summary(slot: str, *, order: int = 100
                     ) -> Callable[[Callable[..., list[str]]], Callable[..., list[str]]]:
    """Register the decorated function's sentences for the report's first-screen ``slot``
    (one of `SUMMARY_SLOTS`; e.g. "early_warning": which signal warned of forgetting first)."""
    if slot not in SUMMARY_SLOTS:
        raise ValueError(f"unknown summary slot {slot!r}; slots: {', '.join(SUMMARY_SLOTS)}")

    def add(build: Callable[..., list[str]]) -> Callable[..., list[str]]:
        _SUMMARIES[f"{build.__module__}.{build.__qualname__}"] = SummarySpec(slot, order, build)
        return build

    return add


def summary_specs() -> tuple[SummarySpec, ...]:
    """Every registered summary function, by slot order then ``order``."""
    table_specs()  # imports every analysis module, which registers them
    rank = {s: i for i, s in enumerate(SUMMARY_SLOTS)}
    return tuple(sorted(_SUMMARIES.values(), key=lambda s: (rank[s.slot], s.order)))


def table_specs() -> tuple[TableSpec, ...]:
    """Every registered table in report order (section, then ``order``); importing
    `attndrift.analysis` imports every module of it, which registers them."""
    import importlib
    import importlib.util
    import pkgutil

    package = __name__.rpartition(".")[0]  # found on disk: a new module needs no list entry
    for mod in pkgutil.iter_modules(importlib.util.find_spec(package).submodule_search_locations
                                    or []):
        importlib.import_module(f"{package}.{mod.name}")
    rank = {s.id: i for i, s in enumerate(SECTIONS)}
    return tuple(sorted(_TABLES.values(), key=lambda s: (rank[s.section], s.order)))


# How a missing value (not recorded, or undefined such as the sd of one seed) reads.
NOT_AVAILABLE = "n/a"

# Descriptive columns left out when every row has the default: no "other settings" column when
# nothing else varies, no "regularizer" column when no run used one, no "text tower" column
# when every zero-shot ran through the pretrained one.
OPTIONAL = {"other": "—", "regularizer": "none", "text_tower": "pretrained"}


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
