"""Figures of the attention metrics over training time: metric trajectories (003 Fig. 5, 9), the
layer × training-time heatmap (003 Fig. 4) and the evolution of each attention metric (of Gini
and ERF: 003 Fig. 17), one figure per metric of `attndrift.signals`.
(How training itself went, convergence and collapse onset, is in `attndrift.report.training`.)

Same contract as `attndrift.report.base`: registered, runs in, Figure out, `NoData` when the
runs hold nothing to show, no IO. Every curve is one run or the seed mean of one setting;
colour = the setting family (method hue), darker = higher learning rate, line style =
regularizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from attndrift.analysis.common import SUBSET0, completed, num
from attndrift.analysis.metadata import SHORT, metric_info
from attndrift.analysis.onset import (
    layer_trajectory,
    trajectory,
)
from attndrift.analysis.runs import Run
from attndrift.report.base import SEEDS, NoData, figure_grid, mean_curve, register_figure
from attndrift.report.style import (
    REFERENCE,
    ZERO,
    Palette,
    layer_ticks,
    legend_outside,
    lr_shade,
    nanmean,
    not_available,
    panel_title,
    series_of,
    setting_series,
)
from attndrift.signals import ATTENTION


def probed_runs(runs: Sequence[Run]) -> list[Run]:
    """Runs whose record has attention probes over training."""
    return [r for r in runs if r.record and (r.record.get("history") or {}).get("probes")]


@register_figure(
    "trajectories",
    "Metric trajectories over training",
    section="dynamics",
    order=20,
    drift=SUBSET0,
    caption=f"Drift of the layer-mean metrics at each probe during training, {SEEDS}; "
    "colour = method (shade = variant, darker = higher lr), line style = "
    "regularizer (003 Fig. 5, Fig. 9).",
)
def trajectories(runs: Sequence[Run]) -> Figure:
    """Drift of each metric's layer mean over training, seed mean per setting; one row per
    backbone and dataset, one column per metric."""
    done = probed_runs(completed(runs))
    if not done:
        raise NoData("no completed run recorded attention probes")
    pal = Palette(runs)
    info = metric_info()
    panels = setting_series(done, runs)
    fig, axes = figure_grid(len(panels), len(info), height=2.6)
    for row, (panel, settings) in enumerate(panels.items()):
        head = panel_title(panel, panels)
        for col, m in enumerate(info):
            ax = axes[row, col]
            for s, lr, group in settings:
                x, y = mean_curve([trajectory(r.record, m) for r in group])
                if not np.isfinite(y[1:]).any():
                    continue
                kw = pal.kw(s.label)
                kw["color"] = lr_shade(kw["color"], lr, list(s.by_lr()))
                ax.plot(x, y, ms=3, lw=1.2, label=f"{s.label} · lr {lr:g}", **kw)
            if not ax.lines:
                not_available(ax)
            ax.axhline(0, **ZERO)
            name = f"Δ {SHORT.get(m, m)} %"
            ax.set_title(f"{head}\n{name}" if head else name, fontsize=8)
            ax.set_xlabel("fraction of training", fontsize=8)
            ax.grid(alpha=0.3)
    legend_outside(fig, title="setting · lr (seed mean)")
    return fig


def metric_evolution(runs: Sequence[Run], metric: str) -> Figure:
    """The absolute layer-mean ``metric`` over training, seed mean per setting, with the
    pretrained value as the reference line (003 Fig. 17 for Gini; ERF likewise)."""
    done = probed_runs(completed(runs))
    pal = Palette(runs)
    panels = {p: v for p, v in setting_series(done, runs).items()}
    info = metric_info()
    if metric not in info:
        raise NoData(f"no metric {metric!r}")

    def curve(r: Run) -> tuple[np.ndarray, np.ndarray]:
        base = num(((r.record.get("baseline") or {}).get("mean") or {}).get(metric))
        x, y = [0.0], [base]
        for p in r.record["history"]["probes"]:
            x.append(num(p.get("fraction")))
            y.append(num(((p.get("metrics") or {}).get("mean") or {}).get(metric)))
        return np.asarray(x), np.asarray(y)

    have = {
        p: [
            (s, lr, g) for s, lr, g in v if np.isfinite(mean_curve([curve(r) for r in g])[1]).any()
        ]
        for p, v in panels.items()
    }
    have = {p: v for p, v in have.items() if v}
    if not have:
        raise NoData(f"no completed run recorded {info[metric].label.lower()} at its probes")
    cols = min(2, len(have))
    rows = math.ceil(len(have) / cols)
    fig, axes = figure_grid(rows, cols, width=11.0 if cols == 2 else 7.5, height=3.0)
    for ax in axes.flat[len(have) :]:
        ax.set_visible(False)
    for ax, (panel, settings) in zip(axes.flat, have.items(), strict=False):
        bases = []
        for s, lr, group in settings:
            x, y = mean_curve([curve(r) for r in group])
            bases.append(y[0])
            kw = pal.kw(s.label)
            kw["color"] = lr_shade(kw["color"], lr, list(s.by_lr()))
            ax.plot(x, y, ms=3, lw=1.2, label=f"{s.label} · lr {lr:g}", **kw)
        base = nanmean(bases)
        if math.isfinite(base):
            ax.axhline(base, label="pretrained", **REFERENCE)
        ax.set_title(panel_title(panel, have) or info[metric].label, fontsize=9)
        ax.set_xlabel("fraction of training", fontsize=8)
        ax.set_ylabel(f"{info[metric].label} (layer mean)", fontsize=8)
        ax.grid(alpha=0.3)
    legend_outside(fig, title="setting · lr (seed mean)")
    return fig


# One "<metric>_evolution" figure per attention metric of the signal spec (attndrift.signals),
# in its order; the papers drew Gini (003 Fig. 17) and ERF likewise.
_PAPER_FIGURE = {"gini": " (003 Fig. 17)", "erf": " (003 Fig. 17's companion)"}


def _register_evolution(metric: str, order: int) -> None:
    info = ATTENTION[metric]

    def draw(runs: Sequence[Run]) -> Figure:
        return metric_evolution(runs, metric)

    draw.__name__ = draw.__qualname__ = f"{metric}_evolution"
    unit = f", {info.unit}" if info.unit else ""
    register_figure(
        f"{metric}_evolution",
        f"{info.label} over training",
        section="dynamics",
        order=order,
        drift=SUBSET0,
        caption=f"Layer-mean {info.label[0].lower()}{info.label[1:]} ({info.short}{unit}) at "
        f"each probe, {SEEDS}; dashed black = pretrained{_PAPER_FIGURE.get(metric, '')}.",
    )(draw)


for _k, _m in enumerate(ATTENTION):
    _register_evolution(_m, 40 + _k)


@register_figure(
    "layer_time_heatmap",
    "Layer × training-time entropy",
    section="dynamics",
    order=30,
    drift=SUBSET0,
    caption=f"Per-layer Δ entropy at each probe, {SEEDS}, for every setting family at its "
    "highest learning rate (003 Fig. 4).",
)
def layer_time_heatmap(runs: Sequence[Run], metric: str = "entropy") -> Figure:
    """003 Fig. 4: per-layer drift at each probe (layers × training time), seed mean, for each
    backbone, dataset and setting family at its highest learning rate."""
    done = probed_runs(completed(runs))
    cells = []
    for panel, fams in series_of(done, runs).items():
        for s in fams:
            lr, group = list(s.by_lr().items())[-1]
            mats = [layer_trajectory(r.record, metric) for r in group]
            mats = [m for m in mats if m.size]
            if not mats:
                continue
            n_probes = min(m.shape[0] for m in mats)
            n_layers = min(m.shape[1] for m in mats)
            grid = nanmean([m[:n_probes, :n_layers] for m in mats], axis=0).T
            fracs = [num(p.get("fraction")) for p in group[0].record["history"]["probes"]]
            if np.isfinite(grid).any():
                cells.append((panel, s.label, lr, len(group), grid, fracs[:n_probes]))
    if not cells:
        raise NoData("no completed run recorded per-layer metrics at its probes")
    span = max(float(np.nanmax(np.abs(c[4]))) for c in cells) or 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
    cols = min(4, len(cells))
    n_layers = max(c[4].shape[0] for c in cells)
    height = min(4.5, 0.12 * n_layers + 1.6)
    fig, axes = figure_grid(math.ceil(len(cells) / cols), cols, height=height)
    for ax in axes.flat[len(cells) :]:
        ax.set_visible(False)
    image = None
    panels = [c[0] for c in cells]
    for ax, (panel, label, lr, n, grid, fracs) in zip(axes.flat, cells, strict=False):
        image = ax.imshow(grid, cmap="RdBu", norm=norm, aspect="auto", origin="lower")
        head = panel_title(panel, panels)
        ax.set_title((f"{head}\n" if head else "") + f"{label} · lr {lr:g} (n={n})", fontsize=7)
        layer_ticks(ax, grid.shape[0], axis="y", length_in=height - 1.2, fontsize=6)
        step = max(1, math.ceil(len(fracs) / 5))
        ax.set_xticks(range(0, len(fracs), step), [f"{f:.1f}" for f in fracs[::step]], fontsize=6)
        ax.set_xlabel("fraction of training", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
    fig.colorbar(
        image,
        ax=axes,
        shrink=min(0.8, 4.0 / fig.get_figheight()),
        aspect=15,
        label=f"Δ {metric} % per layer",
    )
    return fig
