"""Figures of how training went: accuracy and entropy over the epochs (003 Fig. 3), every
run's Δ entropy with its collapse onset (003 Fig. 12) and convergence (003 Fig. 14).

Same contract as `attndrift.report.base`: registered, runs in, Figure out, `NoData` when the
runs hold nothing to show, no IO. Colour = the setting family (method hue), darker = higher
learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from attndrift.analysis.common import SUBSET0, completed, converged, num
from attndrift.analysis.onset import ONSET_THRESHOLD_PCT, collapse_onset, trajectory
from attndrift.analysis.runs import Run
from attndrift.analysis.settings import seed_order
from attndrift.report.base import SEEDS, NoData, figure_grid, register_figure
from attndrift.report.dynamics import probed_runs
from attndrift.report.style import (
    ZERO,
    Palette,
    legend_outside,
    lr_shade,
    nanmean,
    not_available,
    panel_title,
    series_of,
    setting_series,
)


@register_figure(
    "accuracy_entropy",
    "Accuracy and entropy over training",
    section="dynamics",
    order=10,
    drift=SUBSET0,
    caption=f"Validation accuracy per epoch and layer-mean entropy at each probe, {SEEDS}, each "
    "setting family at its best learning rate (by validation accuracy); a pair of panels "
    "per backbone and dataset on one epoch axis (003 Fig. 3 drew them on twin y axes).",
)
def accuracy_entropy(runs: Sequence[Run]) -> Figure:
    """003 Fig. 3: validation accuracy and layer-mean entropy over the epochs, seed mean, each
    setting family at its best learning rate (by validation accuracy); per backbone and dataset
    a pair of panels on one epoch axis (003 drew the two on twin y axes; side by side, every
    family keeps its colour and line style)."""
    from attndrift.report.summary import best_lr

    done = [r for r in probed_runs(completed(runs))
            if (r.record.get("history") or {}).get("epochs")]
    if not done:
        raise NoData("no completed run recorded both validation accuracy and probes")
    pal = Palette(runs)
    panels = series_of(done, runs)
    per_row = 2 if len(panels) > 1 else 1
    fig, axes = figure_grid(math.ceil(len(panels) / per_row), 2 * per_row, height=2.8)
    for ax in axes.flat[2 * len(panels) :]:
        ax.set_visible(False)
    flat = list(axes.flat)
    for k, (panel, fams) in enumerate(panels.items()):
        acc_ax, ent_ax = flat[2 * k], flat[2 * k + 1]
        for s in fams:
            lr, group = best_lr(s)
            kw = {**pal.kw(s.label), "ms": 3, "lw": 1.1, "label": f"{s.label} · lr {lr:g}"}
            acc = [
                [
                    (num(e.get("epoch")), 100 * num(e.get("val_acc")))
                    for e in r.record["history"]["epochs"]
                ]
                for r in group
            ]
            ent = [
                [
                    (
                        num(p.get("epoch")),
                        num(((p.get("metrics") or {}).get("mean") or {}).get("entropy")),
                    )
                    for p in r.record["history"]["probes"]
                ]
                for r in group
            ]
            for ax, curves in ((acc_ax, acc), (ent_ax, ent)):
                width = min(len(c) for c in curves)
                if width:
                    pts = nanmean([c[:width] for c in curves], axis=0)
                    ax.plot(pts[:, 0], pts[:, 1], **kw)
        head = panel_title(panel, panels)
        for ax, name in ((acc_ax, "val acc %"), (ent_ax, "entropy, nats (layer mean)")):
            if not ax.lines:
                not_available(ax)
            ax.set_title(f"{head}\n{name}" if head else name, fontsize=8)
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    legend_outside(fig, title="setting at its best lr (seed mean)")
    return fig

@register_figure(
    "training_dynamics",
    "Training dynamics and collapse onset",
    section="dynamics",
    order=60,
    drift=SUBSET0,
    tables=("collapse_onset",),
    caption="Δ entropy at each probe for every run that probed (failed and diverged runs up "
    "to where they stopped, marked ×); ▼ marks the collapse onset, the first probe "
    "below -1% (dotted line). Colour = setting family, darker = higher lr "
    "(003 Fig. 12).",
)
def training_dynamics(runs: Sequence[Run]) -> Figure:
    """Δ entropy over training for every probed run (failed and diverged ones included, as far
    as they got), with the collapse-onset point marked and the -1% threshold drawn."""
    probed = probed_runs(runs)
    if not probed:
        raise NoData("no run recorded attention probes")
    pal = Palette(runs)
    panels = setting_series(probed, runs)
    cols = min(2, len(panels))
    fig, axes = figure_grid(
        math.ceil(len(panels) / cols), cols, width=11.0 if cols == 2 else 7.5, height=3.3
    )
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (panel, settings) in zip(axes.flat, panels.items(), strict=False):
        for s, lr, group in settings:
            kw = pal.kw(s.label)
            color = lr_shade(kw["color"], lr, list(s.by_lr()))
            for i, r in enumerate(group):
                x, y = trajectory(r.record, "entropy")
                ax.plot(
                    x,
                    y,
                    color=color,
                    ls=kw["ls"],
                    lw=1.0,
                    alpha=0.85,
                    label=f"{s.label} · lr {lr:g}" if i == 0 else None,
                )
                onset = collapse_onset(x, y)
                if onset is not None:
                    ax.plot(onset, y[list(x).index(onset)], "v", color=color, ms=6, mec="black")
                if r.status != "completed":
                    ax.plot(x[-1], y[-1], "x", color="black", ms=8)
        ax.axhline(ONSET_THRESHOLD_PCT, color="#7f8c8d", lw=0.8, ls=(0, (1, 2)))
        ax.axhline(0, **ZERO)
        head = panel_title(panel, panels)
        ax.set_title(f"{head}: Δ entropy %" if head else "Δ entropy %", fontsize=9)
        ax.set_xlabel("fraction of training", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    seen = set()
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in seen:
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    extra = [
        Line2D([], [], color="black", marker="v", ls="", label="collapse onset"),
        Line2D([], [], color="#7f8c8d", ls=(0, (1, 2)), label="−1% threshold"),
    ]
    if any(r.status != "completed" for r in probed):
        extra.append(Line2D([], [], color="black", marker="x", ls="", label="not completed"))
    legend_outside(
        fig,
        handles=handles + extra,
        labels=labels + [h.get_label() for h in extra],
        title="setting · lr (one line per run)",
    )
    return fig

@register_figure(
    "convergence",
    "Convergence",
    section="runs",
    order=30,
    tables=("convergence",),
    caption="Training loss per logged step and validation accuracy per epoch of every run "
    "with a history, one row per backbone and dataset; colour = setting family, "
    "darker = higher lr, marker = seed; a black ring marks a run whose last three "
    "epochs of validation accuracy vary by sd ≥ 0.005 (not converged, 003 §4.5) "
    "(003 Fig. 14).",
)
def convergence(runs: Sequence[Run]) -> Figure:
    """Training loss per step and validation accuracy per epoch of every run with a history;
    one row per backbone and dataset, seeds told apart by marker."""

    def hist(r: Run) -> dict:
        return (r.record or {}).get("history") or {}

    have = [r for r in runs if r.record and (hist(r).get("loss") or hist(r).get("epochs"))]
    if not have:
        raise NoData("no run recorded a training history")
    pal = Palette(runs)
    panels = setting_series(have, runs)
    fig, axes = figure_grid(len(panels), 2, height=3.0)
    seed_markers = ("o", "s", "^", "D", "v", "P")
    unconverged = False
    for row, (panel, settings) in enumerate(panels.items()):
        loss_ax, acc_ax = axes[row]
        for s, lr, group in settings:
            color = lr_shade(pal.color(s.label), lr, list(s.by_lr()))
            ls = pal.linestyle(s.label)
            for i, r in enumerate(sorted(group, key=seed_order)):
                label = f"{s.label} · lr {lr:g}" if i == 0 else None
                pts = [
                    (p["step"], p["loss"])
                    for p in hist(r).get("loss", [])
                    if isinstance(p.get("loss"), int | float) and math.isfinite(p["loss"])
                ]
                if pts:
                    loss_ax.plot(
                        *zip(*pts, strict=True), color=color, ls=ls, lw=1.0, alpha=0.7, label=label
                    )
                eps = [
                    (e["epoch"], 100 * e["val_acc"])
                    for e in hist(r).get("epochs", [])
                    if isinstance(e.get("val_acc"), int | float)
                ]
                if eps:
                    acc_ax.plot(
                        *zip(*eps, strict=True),
                        color=color,
                        ls=ls,
                        lw=1.0,
                        alpha=0.8,
                        marker=seed_markers[i % len(seed_markers)],
                        ms=4,
                        label=label if not pts else None,
                    )
                    if converged(r) is False:  # 003 §4.5: late val acc still moving
                        acc_ax.plot(*eps[-1], "o", ms=10, mfc="none", mec="black", mew=1.2)
                        unconverged = True
        head = panel_title(panel, panels)
        for ax, name in ((loss_ax, "training loss"), (acc_ax, "validation accuracy %")):
            if not ax.lines:
                not_available(ax)
            ax.set_title(f"{head}: {name}" if head else name, fontsize=9)
            ax.grid(alpha=0.3)
        loss_ax.set_xlabel("step", fontsize=8)
        acc_ax.set_xlabel("epoch", fontsize=8)
        acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        lo, hi = acc_ax.get_ylim()
        if acc_ax.lines and hi - lo < 4:  # no 0.96-1.04 axis: at least 4 points of accuracy
            mid = (hi + lo) / 2
            acc_ax.set_ylim(max(0, mid - 2), min(100.5, mid + 2))
    n_seeds = max(len(g) for v in panels.values() for _, _, g in v)
    title = "setting · lr" + (" (marker = seed)" if n_seeds > 1 else "")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if unconverged:
        ring = Line2D([], [], marker="o", ms=9, mfc="none", mec="black", ls="")
        handles.append(ring)
        labels.append("not converged (late val acc sd ≥ 0.005)")
    legend_outside(fig, title=title, handles=handles, labels=labels)
    return fig
