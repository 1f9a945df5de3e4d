"""What every report figure shares: the figure registry and the drawing helpers.

A figure is a function ``(runs) -> matplotlib.figure.Figure`` registered where it is drawn:

    @register_figure("lr_panels", "Learning-rate panels", section="results", order=30,
                     drift=SUBSET_MEAN, caption="Test accuracy ... (003 Fig. 6).")
    def lr_panels(runs): ...

``section`` is one of `attndrift.analysis.table.SECTIONS` (the figure is shown there, next to
that section's tables; "summary" is the report's first screen), ``order`` its place in the
section, ``drift`` which Δ it shows (the report adds the matching sentence to the caption) and
``tables`` the tables it should be read with (linked from the caption, or said to be not shown).
`figure_specs()` imports every module of `attndrift.report`, so a figure in a new module is
found without listing it anywhere. No IO and no pyplot state in a figure function: it builds a
`Figure` (rendered by Agg when saved) or raises `NoData` saying why it cannot.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from attndrift.analysis.common import SUBSET0, SUBSET_MEAN
from attndrift.analysis.runs import Run, method_label, regularizer_label
from attndrift.analysis.table import SECTIONS
from attndrift.report.style import Palette

DPI = 100
SEEDS = "mean over the seeds of each setting"
# Which drift a figure reads (issue 12 item 3): run-level Δ is the mean over the fixed probe
# subsets of each subset's drift, as 002 reports it; per-layer and over-training values exist
# for probe subset 0 only (the subset probed during training).
DRIFT_NOTES = {
    SUBSET_MEAN: " Δ of a run: mean over the fixed probe subsets (002).",
    SUBSET0: " Per-layer and over-training values: probe subset 0, the subset probed in training.",
}
SUBSET0_FALLBACK = " Δ of a run: probe subset 0 (these records have no subset means)."


class NoData(Exception):
    """The runs hold nothing this figure can show; ``str()`` says why."""


@dataclass(frozen=True)
class FigureSpec:
    name: str  # file stem under figures/
    title: str
    caption: str
    draw: Callable[[Sequence[Run]], Figure]
    section: str = "results"
    order: int = 100
    drift: str | None = None  # SUBSET_MEAN | SUBSET0 | None: which Δ the figure shows
    tables: tuple[str, ...] = ()  # tables to read it with

    def caption_for(self, drift: str) -> str:
        """The caption with the sentence saying which drift it shows, for a store read as
        ``drift`` (`analysis.resolve_drift`)."""
        if self.drift is None:
            return self.caption
        if self.drift == SUBSET_MEAN and drift == SUBSET0:
            return self.caption + SUBSET0_FALLBACK
        return self.caption + DRIFT_NOTES[self.drift]


@dataclass(frozen=True)
class FigureOut:
    """A drawn figure (``png``) or why it was not (``skipped``)."""

    name: str
    title: str
    caption: str
    png: bytes | None
    skipped: str | None = None
    section: str = "results"
    tables: tuple[str, ...] = ()


_FIGURES: dict[str, FigureSpec] = {}


def register_figure(name: str, title: str, *, caption: str, section: str = "results",
                    order: int = 100, drift: str | None = None, tables: Sequence[str] = ()
                    ) -> Callable[[Callable[[Sequence[Run]], Figure]],
                                  Callable[[Sequence[Run]], Figure]]:
    """Register the decorated ``(runs) -> Figure`` function as report figure ``name``."""
    if section not in {s.id for s in SECTIONS}:
        raise ValueError(f"figure {name!r}: unknown section {section!r}")

    def add(draw: Callable[[Sequence[Run]], Figure]) -> Callable[[Sequence[Run]], Figure]:
        old = _FIGURES.get(name)
        if old is not None and old.draw.__qualname__ != draw.__qualname__:
            raise ValueError(f"figure {name!r} is registered twice")
        _FIGURES[name] = FigureSpec(name, title, caption, draw, section, order, drift,
                                    tuple(tables))
        return draw

    return add


def figure_specs() -> tuple[FigureSpec, ...]:
    """Every registered figure in report order (section, then ``order``)."""
    import_package_modules(__name__)
    rank = {s.id: i for i, s in enumerate(SECTIONS)}
    return tuple(sorted(_FIGURES.values(), key=lambda s: (rank[s.section], s.order)))


def import_package_modules(module: str) -> None:
    """Import every module of ``module``'s package (found on disk, so a new module needs no
    list entry): importing them runs their registrations."""
    package = module.rpartition(".")[0]
    spec = importlib.util.find_spec(package)
    for mod in pkgutil.iter_modules(spec.submodule_search_locations or []):
        importlib.import_module(f"{package}.{mod.name}")


def series_label(run: Run) -> str:
    """Method, plus the regularizer when there is one (the summary's coarse label)."""
    reg = regularizer_label(run.config)
    return method_label(run.config) + ("" if reg == "none" else f" + {reg}")


def figure_grid(rows: int, cols: int, width: float = 11.0, height: float = 2.9
                ) -> tuple[Figure, np.ndarray]:
    """A pyplot-free figure with a ``[rows, cols]`` array of axes; ``height`` is per row."""
    fig = Figure(figsize=(width, height * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def clipped_yerr(mean: Sequence[float], sd: Sequence[float], lo: float = -math.inf,
                 hi: float = math.inf) -> np.ndarray:
    """``[2, n]`` error bars of ± sd, cut at the valid range [lo, hi] (no bar above 100%)."""
    m = np.asarray(mean, dtype=float)
    s = np.nan_to_num(np.asarray(sd, dtype=float), nan=0.0)
    return np.vstack(
        [np.clip(np.minimum(s, m - lo), 0, None), np.clip(np.minimum(s, hi - m), 0, None)]
    )


def hbars(ax, labels: list[str], stats: list[tuple[float, float, int]], families: list[str],
          pal: Palette, lo: float = -math.inf, hi: float = math.inf) -> None:
    """Horizontal bars of (mean, sd, n) per row, coloured and hatched by family; ±1 sd clipped
    to [lo, hi]; 'not available' where a row has no value."""
    y = np.arange(len(labels))
    means = [s[0] for s in stats]
    err = clipped_yerr(np.nan_to_num(means), [s[1] for s in stats], lo, hi)
    bars = ax.barh(y, np.nan_to_num(means), 0.7, xerr=err, edgecolor="black", lw=0.4,
                   capsize=2, color=[pal.color(f) for f in families])
    for patch, fam in zip(bars.patches, families, strict=True):
        patch.set_hatch(pal.hatch(fam))
    for yi, (_, _, n) in zip(y, stats, strict=True):
        if n == 0:
            ax.text(0, yi, " not available", va="center", fontsize=6, color="grey")
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.grid(alpha=0.3, axis="x")


def mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The pointwise mean of (x, y) curves, cut to the shortest."""
    from attndrift.report.style import nanmean

    width = min(len(c[0]) for c in curves)
    return (nanmean([c[0][:width] for c in curves], axis=0),
            nanmean([c[1][:width] for c in curves], axis=0))
