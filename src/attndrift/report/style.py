"""One look and one grouping for every figure of the report.

Grouping (issue 12): a figure series is the seeds of one *setting* and nothing else. Panels are
split by the axes (backbone, dataset); within a panel, a *family* is a setting minus its
learning rate, so lr panels and heatmaps draw one series (or row block) per family, labelled by
what distinguishes the families present (computed from the configs, not hand-listed).

Look (issue 17): one colour per method in every figure (variants of a method, e.g. LoRA r=4 and
r=16, are shades of it and differ in marker), one line style per regularizer, legends outside
the data, a single reference-line style for pretrained values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure

from attndrift.analysis.common import delta, resolve_drift
from attndrift.analysis.runs import LR_KEYS, Run, dataset_of, lr_of, model_of, short_model
from attndrift.analysis.runs import family_key as analysis_family_key
from attndrift.analysis.settings import Family, group_families
from attndrift.methods import METHODS, REGULARIZERS

# Colours, line styles, markers and hatches are declared with each method and regularizer
# (`attndrift.methods`); unregistered ones (e.g. `measure`'s external) get OTHER_COLORS.
METHOD_COLORS = {name: spec.color for name, spec in METHODS.items()}
OTHER_COLORS = ("#d35400", "#17a589", "#b7950b", "#5d6d7e")
REG_LINESTYLES = {"none": "-", **{n: s.linestyle for n, s in REGULARIZERS.items()}}
# The first variant of a method in its own hue, the next ones lighter and darker in turn.
_VARIANT_SHADES = (0.0, 0.4, -0.35, 0.6, -0.55, 0.2, -0.2)
VARIANT_MARKERS = ("o", "s", "^", "D", "v", "h", "p", "8")
# A regularized family: its own marker in scatter plots and a hatch on bars (bars have no line
# style), so it never looks like its unregularized twin.
REG_MARKERS = {n: s.marker for n, s in REGULARIZERS.items()}
REG_HATCHES = {"none": "", **{n: s.hatch for n, s in REGULARIZERS.items()}}
# Pretrained / reference values: thin, black, long dashes (no regularizer uses this pattern).
REFERENCE = {"color": "black", "lw": 0.9, "ls": (0, (6, 3)), "alpha": 0.7}
ZERO = {"color": "grey", "lw": 0.8}

# Panel axes: a backbone or a dataset is never a series of another one's panel; a family is a
# setting without these and without its learning rate.
AXIS_KEYS = ("model", "data.dataset")
FAMILY_WITHOUT = (*LR_KEYS, *AXIS_KEYS)


def model_name(config: dict[str, Any]) -> str:
    """A backbone's short name: ``openai/clip-vit-base-patch16`` -> ``ViT-B/16``."""
    return short_model(model_of(config))


def panel_of(run: Run) -> tuple[str, str]:
    """(backbone, dataset): the axes every figure splits panels by."""
    return model_name(run.config), dataset_of(run.config)


def panel_title(panel: tuple[str, str], panels: Iterable[tuple[str, str]]) -> str:
    """The parts of ``panel`` that vary between ``panels`` ('' when there is only one)."""
    panels = list(panels)
    parts = [p for i, p in enumerate(panel) if len({q[i] for q in panels}) > 1]
    return " · ".join(parts)


def family_key(run: Run) -> tuple:
    """A run's setting without learning rate, backbone and dataset: what one series spans."""
    return analysis_family_key(run.config, FAMILY_WITHOUT)


def families(runs: Sequence[Run]) -> list[Family]:
    """The families of ``runs`` in `setting_order`, labelled by what distinguishes them
    (method with its options, regularizer, other keys: `attndrift.analysis.settings.labels_of`)."""
    return group_families(runs, FAMILY_WITHOUT)


def family_labels(runs: Sequence[Run]) -> dict[tuple, str]:
    """family_key -> label among the families of ``runs``."""
    return {f.key: f.label for f in families(runs)}


@dataclass(frozen=True)
class Series:
    """The runs of one family in one panel (all seeds and lrs of one setting family)."""

    panel: tuple[str, str]
    key: tuple
    label: str
    runs: tuple[Run, ...]

    def by_lr(self) -> dict[float, list[Run]]:
        """lr -> the seeds of that setting, lrs ascending."""
        out: dict[float, list[Run]] = {}
        for r in sorted(self.runs, key=lambda r: lr_of(r.config)):
            out.setdefault(lr_of(r.config), []).append(r)
        return out


def _fold(s: str) -> str:
    return s.casefold()


def series_of(
    runs: Sequence[Run], context: Sequence[Run] | None = None
) -> dict[tuple[str, str], list[Series]]:
    """panel -> its families. Labels and order come from ``context`` (default ``runs``): pass
    the report's whole run set when ``runs`` is a subset, so a family keeps one label (and one
    colour) in every figure. Panels in case-insensitive order."""
    fams = families(context if context is not None else runs)
    labels = {f.key: f.label for f in fams}
    rank = {f.key: i for i, f in enumerate(fams)}
    grouped: dict[tuple[str, str], dict[tuple, list[Run]]] = {}
    for r in runs:
        if r.record is not None:
            grouped.setdefault(panel_of(r), {}).setdefault(family_key(r), []).append(r)
    out = {}
    for panel in sorted(grouped, key=lambda p: tuple(map(_fold, p))):
        found = [Series(panel, k, labels.get(k, "?"), tuple(v)) for k, v in grouped[panel].items()]
        out[panel] = sorted(found, key=lambda s: (rank.get(s.key, len(rank)), _fold(s.label)))
    return out


def setting_series(
    runs: Sequence[Run], context: Sequence[Run] | None = None
) -> dict[tuple[str, str], list[tuple[Series, float, list[Run]]]]:
    """panel -> (family, lr, seeds) for every setting: the finest grouping a figure draws."""
    return {
        p: [(s, lr, g) for s in fams for lr, g in s.by_lr().items()]
        for p, fams in series_of(runs, context).items()
    }


class Palette:
    """Colour, marker and line style of every family of a run set, fixed for the whole report
    (the report passes the same runs to every figure)."""

    _extra: dict[str, str]

    def __init__(self, runs: Sequence[Run]):
        fams = families(runs)  # in setting order: full FT, LoRA by r, ...
        self.labels = {f.key: f.label for f in fams}
        by_method: dict[str, list[tuple]] = {}
        for f in fams:
            variants = by_method.setdefault(str(f.settings[0].config.get("method")), [])
            if _variant(f.key) not in variants:
                variants.append(_variant(f.key))
        others = iter(OTHER_COLORS * 4)
        self._extra = {}
        self._hatch: dict[str, str] = {}
        self._style: dict[str, tuple[str, str, Any]] = {}
        for f in fams:
            method = str(f.settings[0].config.get("method"))
            if method not in METHOD_COLORS and method not in self._extra:
                self._extra[method] = next(others)
            base = METHOD_COLORS.get(method) or self._extra[method]
            # variants of a method differ in marker and shade, never in hue; the regularizer
            # alone sets the line style
            k = by_method[method].index(_variant(f.key))
            reg = str((f.settings[0].config.get("regularizer") or {}).get("name", "none"))
            self._style[f.label] = (
                _shade(base, _VARIANT_SHADES[k % len(_VARIANT_SHADES)]),
                REG_MARKERS.get(reg) or VARIANT_MARKERS[k % len(VARIANT_MARKERS)],
                REG_LINESTYLES.get(reg, (0, (3, 1, 1, 1, 1, 1))),
            )
            self._hatch[f.label] = REG_HATCHES.get(reg, "++")

    def _get(self, label: str) -> tuple[str, str, Any]:
        return self._style.get(label, ("#555555", "o", "-"))

    def hatch(self, label: str) -> str:
        return self._hatch.get(label, "")

    def color(self, label: str) -> str:
        return self._get(label)[0]

    def marker(self, label: str) -> str:
        return self._get(label)[1]

    def linestyle(self, label: str) -> Any:
        return self._get(label)[2]

    def kw(self, label: str) -> dict[str, Any]:
        """Line keywords of a family: color, marker, linestyle."""
        c, m, ls = self._get(label)
        return {"color": c, "marker": m, "ls": ls}


def method_color(run: Run) -> str:
    return METHOD_COLORS.get(str(run.config.get("method")), "#555555")


def _variant(fk: tuple) -> tuple:
    """A family key without its regularizer: the variant of the method a marker names."""
    return tuple(kv for kv in fk if not kv[0].startswith("regularizer."))


def _shade(color: str, amount: float) -> str:
    """Darker (amount < 0) or lighter (> 0) version of ``color``, same hue."""
    rgb = np.array(to_rgb(color))
    out = rgb * (1 + amount) if amount < 0 else rgb + (1 - rgb) * amount
    return to_hex(np.clip(out, 0, 1))


def lr_shade(color: str, lr: float, lrs: Sequence[float]) -> str:
    """Darker for a higher learning rate (the study's convention), lighter for a lower one."""
    lrs = sorted(set(lrs))
    if len(lrs) < 2:
        return color
    k = lrs.index(lr)
    return _shade(color, 0.45 - 0.75 * k / (len(lrs) - 1))


def drift_reader(runs: Sequence[Run]) -> Any:
    """``(run, metric) -> Δ %`` as the tables read it for this store: the mean over the fixed
    probe subsets (002), or subset 0 for a store whose records have no subset means."""
    drift = resolve_drift(runs)
    return lambda run, metric: delta(run, metric, drift)


# --- numbers ---------------------------------------------------------------------------------


def nanmean(values: Iterable[float], axis: int | None = None) -> Any:
    """Mean ignoring NaN, NaN (not a warning) where nothing is finite."""
    a = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis) if a.size else math.nan


def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample sd, n) of the finite values; sd is NaN below two values."""
    a = np.asarray(
        [v for v in values if isinstance(v, int | float) and math.isfinite(v)], dtype=float
    )
    if a.size == 0:
        return math.nan, math.nan, 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan, int(a.size)


# --- layout ----------------------------------------------------------------------------------


def not_available(ax: Axes) -> None:
    """Mark a panel the runs hold no data for (never an empty panel)."""
    ax.text(
        0.5, 0.5, "not available", ha="center", va="center", transform=ax.transAxes, color="grey"
    )


def legend_outside(
    fig: Figure,
    axes: Sequence[Axes] | None = None,
    title: str | None = None,
    handles: list | None = None,
    labels: list | None = None,
) -> None:
    """One legend for the figure, right of the panels (never over the data), entries merged
    over ``axes`` by label. Nothing when there is nothing to name."""
    if handles is None:
        seen: dict[str, Any] = {}
        for ax in axes if axes is not None else fig.axes:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                if lab and not lab.startswith("_"):
                    seen.setdefault(lab, h)
        handles, labels = list(seen.values()), list(seen)
    if not handles:
        return
    size = 8 if len(handles) <= 12 else 7
    fig.legend(
        handles,
        labels,
        loc="outside right upper",
        fontsize=size,
        title=title,
        title_fontsize=size,
        frameon=False,
    )


def tick_step(n: int, length_pt: float, label_pt: float) -> int:
    """Every k-th of ``n`` ticks, so labels of ``label_pt`` width fit ``length_pt``."""
    return max(1, math.ceil(n * label_pt / max(length_pt, 1.0)))


def layer_ticks(
    ax: Axes, n_layers: int, axis: str = "x", length_in: float = 3.0, fontsize: float = 7
) -> None:
    """Layer ticks 1..L, thinned so labels never touch: every k-th layer counted back from
    the last, so the last layer (the one nearest the output) is always labelled."""
    step = tick_step(n_layers, length_in * 72, fontsize * 1.6 + 3)
    idx = list(range(n_layers - 1, -1, -step))[::-1]
    labels = [str(i + 1) for i in idx]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(idx, labels, fontsize=fontsize)


def annotation_size(cell_w_in: float, cell_h_in: float, chars: int) -> float | None:
    """Font size (pt) at which a ``chars``-character number fits a heatmap cell, or None when
    it would be under 6 pt (then the cells go unannotated; the numbers are in the CSV)."""
    size = min(9.0, cell_w_in * 72 / (0.62 * chars + 0.6), cell_h_in * 72 * 0.55)
    return size if size >= 6.0 else None
