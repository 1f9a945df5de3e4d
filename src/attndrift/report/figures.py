"""The report's structure figures: the pretrained structure, per-layer drift, the learning-rate
panels and the regularization comparison. One function per figure, registered with its title
and caption (`base.register_figure`): runs in, matplotlib Figure out, `NoData` when the runs
hold nothing to show, no IO. Every series is the seeds of one setting; panels split by backbone
and dataset; colours, markers and line styles come from `style.Palette`, so a method looks the
same in every figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from attndrift.analysis.common import SUBSET0, SUBSET_MEAN, completed, final, num, zs, zs_tasks
from attndrift.analysis.metadata import SHORT, core_metrics, metric_info
from attndrift.analysis.runs import Run
from attndrift.report import style
from attndrift.report.base import SEEDS, NoData, clipped_yerr, figure_grid, hbars, register_figure
from attndrift.report.style import (
    REFERENCE,
    ZERO,
    Palette,
    annotation_size,
    drift_reader,
    layer_ticks,
    legend_outside,
    mean_sd,
    nanmean,
    not_available,
    panel_title,
    series_of,
)
from attndrift.signals import ATTENTION


@register_figure(
    "baseline_structure",
    "Pretrained attention structure",
    section="results",
    order=40,
    tables=("baseline_structure", "baseline_summary"),
    caption="The pretrained model's attention metrics per layer (one panel each: "
    f"{', '.join(s.short for s in ATTENTION.values())}; layer 1 nearest the input), per "
    "backbone and dataset's probe images: the structure fine-tuning starts from (003 Fig. 2).",
)
def baseline_structure(runs: Sequence[Run]) -> Figure:
    """The pretrained model's attention metrics per layer, one line per backbone and probe
    set."""
    bases = {}
    for r in completed(runs):
        base = (r.record or {}).get("baseline") or {}
        if base.get("entropy"):
            bases.setdefault(style.panel_of(r), base)
    if not bases:
        raise NoData("no completed run has a pretrained baseline")
    info = metric_info()
    # one panel per attention metric (attndrift.signals), each ~2.4 in wide
    fig, axes = figure_grid(1, len(info), width=max(11.0, 2.4 * len(info) + 1.5), height=3.0)
    for ax, m in zip(axes[0], info, strict=True):
        n_layers = 1
        for panel, base in bases.items():
            layers = [num(v) for v in (base.get(m) or {}).get("layers") or []]
            if layers and any(math.isfinite(v) for v in layers):
                ax.plot(
                    range(len(layers)),
                    layers,
                    marker="o",
                    ms=3,
                    label=panel_title(panel, bases) or panel[1],
                )
                n_layers = max(n_layers, len(layers))
        if not ax.lines:
            not_available(ax)
        layer_ticks(ax, n_layers, length_in=2.0)
        ax.set_title(info[m].label, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel(info[m].unit or "value")
        ax.grid(alpha=0.3)
    legend_outside(fig, title="probe images")
    return fig


def _cell_text(v: float) -> str:
    return f"{v:+.0f}" if abs(v) >= 99.5 else f"{v:+.1f}"


@register_figure(
    "layer_delta_heatmaps",
    "Per-layer Δ entropy: setting × layer",
    section="results",
    order=120,
    drift=SUBSET0,
    tables=("per_layer_delta",),
    caption=f"Drift of each layer's CLS→patch entropy vs the pretrained model, {SEEDS}; one "
    "panel per backbone and dataset, one row per setting (a family's learning rates "
    "together, families divided by a line). Blue = broader attention, red = more "
    "concentrated; cells unannotated where a number would not fit at 6 pt (values in "
    "per_layer_delta.csv) (003 Fig. 10).",
)
def layer_delta_heatmaps(runs: Sequence[Run], metric: str = "entropy") -> Figure:
    """Per-layer drift (seed mean): one panel per backbone and dataset, one row per setting
    (its family's rows together, learning rates ascending, families divided by a line)."""
    grids = []
    for panel, fams in series_of(completed(runs), runs).items():
        rows, labels, breaks = [], [], []
        for s in fams:
            start = len(rows)
            for lr, group in s.by_lr().items():
                vals = [final(r).get("delta_pct_layers", {}).get(metric) or [] for r in group]
                vals = [[num(x) for x in v] for v in vals if v]
                if vals:
                    width = min(len(v) for v in vals)
                    rows.append(nanmean([v[:width] for v in vals], axis=0))
                    labels.append(f"{s.label} · lr {lr:g} (n={len(vals)})")
            if len(rows) > start and start:
                breaks.append(start - 0.5)
        if rows:
            width = min(len(r) for r in rows)
            grids.append((panel, labels, breaks, np.array([r[:width] for r in rows])))
    if not grids:
        raise NoData("no completed run has per-layer drift")
    finite = [np.abs(g[3][np.isfinite(g[3])]) for g in grids]
    span = max((float(f.max()) for f in finite if f.size), default=0.0) or 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
    n_layers = max(g[3].shape[1] for g in grids)
    label_in = 0.055 * max(len(lab) for g in grids for lab in g[1]) + 0.3
    # wide enough panels that a 5-character number fits its cell at >= 6 pt, up to 24 layers
    cols = 2 if len(grids) > 1 and (10.0 / 2 - label_in - 0.3) / n_layers >= 0.3 else 1
    panel_w = 10.0 / cols - label_in - 0.4 - (0.8 if cols == 1 else 0.4)
    n_rows = max(len(g[1]) for g in grids)
    fig, axes = figure_grid(
        math.ceil(len(grids) / cols), cols, width=11.0, height=0.3 * n_rows + 1.2
    )
    for ax in axes.flat[len(grids) :]:
        ax.set_visible(False)
    image = None
    panels = [g[0] for g in grids]
    for ax, (panel, labels, breaks, grid) in zip(axes.flat, grids, strict=False):
        image = ax.imshow(grid, cmap="RdBu", norm=norm, aspect="auto")
        ax.set_title(panel_title(panel, panels) or f"Δ {SHORT.get(metric, metric)} %", fontsize=9)
        layer_ticks(ax, grid.shape[1], length_in=panel_w)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for y in breaks:
            ax.axhline(y, color="black", lw=1.2)
        ax.set_xlabel("layer", fontsize=8)
        texts = [_cell_text(v) for v in grid.flat if math.isfinite(v)]
        size = annotation_size(
            panel_w / grid.shape[1], 0.3, max((len(t) for t in texts), default=4)
        )
        if size is not None:
            for (i, j), v in np.ndenumerate(grid):
                if math.isfinite(v):
                    ax.text(
                        j,
                        i,
                        _cell_text(v),
                        ha="center",
                        va="center",
                        fontsize=size,
                        color="white" if abs(v) > 0.6 * span else "black",
                    )
    fig.colorbar(
        image,
        ax=axes,
        shrink=min(0.8, 4.0 / fig.get_figheight()),
        aspect=15,
        label=f"Δ {SHORT.get(metric, metric)} % per layer",
    )
    return fig


@register_figure(
    "lr_panels",
    "Learning-rate panels",
    section="results",
    order=60,
    drift=SUBSET_MEAN,
    tables=("lr_sweep",),
    caption="Test accuracy, Δ entropy and zero-shot accuracy per transfer task against the "
    "learning rate; one line per setting family, mean ± 1 sd over seeds (clipped "
    "to the valid range; no bar with one seed); dashed black = pretrained zero-shot "
    "accuracy (003 Fig. 6).",
)
def lr_panels(runs: Sequence[Run]) -> Figure:
    """Accuracy, Δ entropy and zero-shot vs learning rate: mean ± sd over seeds per setting
    family, one row per backbone and dataset; the pretrained zero-shot accuracy drawn."""
    delta = drift_reader(runs)
    done = completed(runs)
    tasks = zs_tasks(done)
    pal = Palette(runs)
    panels = {
        p: [s for s in fams if len(s.by_lr()) >= 2] for p, fams in series_of(done, runs).items()
    }
    panels = {p: f for p, f in panels.items() if f}
    if not panels:
        raise NoData("no setting was run at two or more learning rates")
    outcomes = [
        ("test acc %", lambda r: 100 * num(final(r).get("test_acc")), (0, 100)),
        ("Δ entropy %", lambda r: delta(r, "entropy"), (-100, math.inf)),
    ]
    outcomes += [(f"zero-shot {t} %", lambda r, t=t: 100 * zs(r, t), (0, 100)) for t in tasks]
    if not any(math.isfinite(outcomes[0][1](r)) for r in done):
        outcomes[0] = (
            "best val acc %",
            lambda r: 100 * num(final(r).get("best_val_acc")),
            (0, 100),
        )
    all_lrs = sorted({lr for fams in panels.values() for s in fams for lr in s.by_lr()})
    fig, axes = figure_grid(len(panels), len(outcomes), height=2.8)
    for row, (panel, fams) in enumerate(panels.items()):
        head = panel_title(panel, panels)
        for col, (name, get, (lo, hi)) in enumerate(outcomes):
            ax = axes[row, col]
            for s in fams:
                pts = [(lr, *mean_sd(get(r) for r in g)) for lr, g in s.by_lr().items()]
                pts = [p for p in pts if p[3] > 0]
                if not pts:
                    continue
                lrs, mean, sd, _ = zip(*pts, strict=True)
                ax.errorbar(
                    lrs,
                    mean,
                    yerr=clipped_yerr(mean, sd, lo, hi),
                    ms=4,
                    capsize=3,
                    label=s.label,
                    **pal.kw(s.label),
                )
            if name.startswith("zero-shot"):
                task = name.split()[1]
                before = nanmean([100 * zs(r, task, "before") for s in fams for r in s.runs])
                if math.isfinite(before):
                    ax.axhline(before, label="pretrained", **REFERENCE)
            if not ax.lines and not ax.collections:
                not_available(ax)
            ax.set_xscale("log")
            ax.set_xticks(
                all_lrs,
                [f"{lr:g}" for lr in all_lrs],
                fontsize=7,
                rotation=30 if len(all_lrs) > 3 else 0,
            )
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{head}\n{name}" if head else name, fontsize=8)
            ax.set_xlabel("learning rate", fontsize=8)
            ax.grid(alpha=0.3)
            if name.startswith("Δ"):
                ax.axhline(0, **ZERO)
    legend_outside(fig, title="setting (±1 sd over seeds)")
    return fig


@register_figure(
    "regularization",
    "Regularization",
    section="results",
    order=90,
    drift=SUBSET_MEAN,
    tables=("regularization",),
    caption="Δ of every attention metric of regularized and weight-decay variants next to the "
    "setting that differs from them only in that, at the same learning rate (mean "
    "± 1 sd over seeds) (003 Fig. 8).",
)
def regularization(runs: Sequence[Run]) -> Figure:
    """Drift of every attention metric of every setting whose family differs from another only
    in the regularizer or the weight decay (so the unregularized run stands next to its
    variants), mean ± sd over seeds."""
    delta = drift_reader(runs)
    pal = Palette(runs)
    metrics = list(core_metrics())
    bars = []  # (panel, label, lr, group)
    for panel, fams in series_of(completed(runs), runs).items():

        def base(s: style.Series) -> tuple:
            return tuple(
                kv
                for kv in s.key
                if not kv[0].startswith("regularizer.") and kv[0] != "train.weight_decay"
            )

        by_base: dict[tuple, list[style.Series]] = {}
        for s in fams:
            by_base.setdefault(base(s), []).append(s)
        for group in by_base.values():
            if len(group) < 2:
                continue
            # at each lr, every family of the group run there (if it is not alone)
            for lr in sorted(set().union(*(s.by_lr() for s in group))):
                here = [s for s in group if lr in s.by_lr()]
                if len(here) >= 2:
                    bars += [(panel, s.label, lr, s.by_lr()[lr]) for s in here]
    if not bars:
        raise NoData(
            "no regularized or weight-decay variant next to a run that differs only in that"
        )
    panels = [b[0] for b in bars]
    labels = [
        " · ".join(p for p in (panel_title(b[0], panels), b[1], f"lr {b[2]:g}") if p)
        + f"  (n={len(b[3])})"
        for b in bars
    ]
    fig, axes = figure_grid(1, len(metrics), width=max(11.0, 2.4 * len(metrics) + 2.5),
                            height=max(2.6, 0.32 * len(bars) + 1.2))
    for ax, m in zip(axes[0], metrics, strict=True):
        hbars(
            ax,
            labels if m == metrics[0] else [""] * len(bars),
            [mean_sd(delta(r, m) for r in b[3]) for b in bars],
            [b[1] for b in bars],
            pal,
        )
        ax.axvline(0, **ZERO)
        ax.set_title(f"Δ {SHORT[m]} %", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # a panel per metric: few ticks
        ax.grid(alpha=0.3, axis="x")
    fig.supxlabel("drift vs pretrained (%), ±1 sd over seeds", fontsize=8)
    return fig
