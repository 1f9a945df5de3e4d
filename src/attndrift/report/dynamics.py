"""Figures over training time: metric trajectories, collapse onset, convergence.

Same contract as `attndrift.report.figures`: runs in, Figure out, `NoData` when the runs hold
nothing to show, no IO.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from attndrift.analysis.common import completed
from attndrift.analysis.metadata import metric_info
from attndrift.analysis.onset import ONSET_THRESHOLD_PCT, collapse_onset, trajectory
from attndrift.analysis.runs import Run, dataset_of, lr_of
from attndrift.report.figures import (
    NoData,
    figure_grid,
    grouped,
    method_color,
    regularizer_style,
    series_label,
)


def _probed(runs: Sequence[Run]) -> list[Run]:
    return [r for r in runs if r.record and (r.record.get("history") or {}).get("probes")]


def trajectories(runs: Sequence[Run]) -> Figure:
    """Drift of each metric's layer mean over training, mean over seeds, per method and lr:
    full FT vs LoRA (and any other method) side by side, one row per dataset."""
    done = _probed(completed(runs))
    if not done:
        raise NoData("no completed run recorded attention probes")
    info = metric_info()
    datasets = sorted({dataset_of(r.config) for r in done})
    fig, axes = figure_grid(len(datasets), len(info), height=2.8)
    for (dataset, label, lr), group in grouped(
            done, lambda r: (dataset_of(r.config), series_label(r), lr_of(r.config))).items():
        row = datasets.index(dataset)
        lrs = sorted({lr_of(r.config) for r in done if series_label(r) == label})
        shade = 0.35 + 0.65 * (lrs.index(lr) + 1) / len(lrs)
        for col, m in enumerate(info):
            curves = [trajectory(r.record, m) for r in group]
            width = min(len(c[0]) for c in curves)
            x = np.nanmean([c[0][:width] for c in curves], axis=0)
            y = np.nanmean([c[1][:width] for c in curves], axis=0)
            ax = axes[row, col]
            ax.plot(x, y, color=method_color(group[0]), alpha=shade, marker=".", ms=3,
                    ls=regularizer_style(group[0])[1],
                    label=f"{label}, lr {lr:g}" + (f" (n={len(group)})" if len(group) > 1
                                                  else ""))
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(f"{dataset}: Δ {info[m].label} %" if len(datasets) > 1
                         else f"Δ {info[m].label} %", fontsize=9)
            ax.set_xlabel("fraction of training", fontsize=8)
            ax.grid(alpha=0.3)
    for row in range(len(datasets)):
        axes[row, 0].legend(fontsize=6)
    return fig


def training_dynamics(runs: Sequence[Run]) -> Figure:
    """Δ entropy over training for every probed run (failed and diverged ones included, as far
    as they got), with the collapse-onset point marked and the -1% threshold drawn."""
    probed = _probed(runs)
    if not probed:
        raise NoData("no run recorded attention probes")
    datasets = sorted({dataset_of(r.config) for r in probed})
    lrs = [lr_of(r.config) for r in probed]
    norm = LogNorm(min(lrs), max(lrs)) if min(lrs) < max(lrs) else None
    cmap = colormaps["viridis"]
    fig, axes = figure_grid(1, len(datasets), width=min(11.0, 5.0 * len(datasets)), height=3.6)
    for r in probed:
        ax = axes[0, datasets.index(dataset_of(r.config))]
        x, y = trajectory(r.record, "entropy")
        # viridis without its pale yellow end, which vanishes on white
        color = cmap(0.85 * float(norm(lr_of(r.config)))) if norm else method_color(r)
        style = "-" if r.config.get("method") == "full_ft" else "--"
        ax.plot(x, y, style, color=color, lw=1.1, alpha=0.85)
        onset = collapse_onset(x, y)
        if onset is not None:
            ax.plot(onset, y[list(x).index(onset)], "v", color=color, ms=7, mec="black")
        if r.status != "completed":
            ax.plot(x[-1], y[-1], "x", color="black", ms=8)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        ax.axhline(ONSET_THRESHOLD_PCT, color="#c0392b", lw=0.8, ls=":")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{dataset}: Δ entropy %", fontsize=9)
        ax.set_xlabel("fraction of training")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(handles=[Line2D([], [], color="black", ls="-", label="full FT"),
                               Line2D([], [], color="black", ls="--", label="other methods"),
                               Line2D([], [], color="black", marker="v", ls="", label="onset"),
                               Line2D([], [], color="black", marker="x", ls="",
                                      label="not completed")], fontsize=7)
    if norm:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, shrink=0.8,
                     label="learning rate")
    return fig


def convergence(runs: Sequence[Run]) -> Figure:
    """Training loss per step and validation accuracy per epoch of every run with a history."""
    have = [r for r in runs if r.record and ((r.record.get("history") or {}).get("loss")
                                             or (r.record.get("history") or {}).get("epochs"))]
    if not have:
        raise NoData("no run recorded a training history")
    fig, axes = figure_grid(1, 2, height=3.4)
    loss_ax, acc_ax = axes[0]
    for label, group in grouped(have, series_label).items():
        for i, r in enumerate(group):
            hist = r.record["history"]
            pts = [(p["step"], p["loss"]) for p in hist.get("loss", []) if p.get("loss")
                   is not None]
            kw = {"color": method_color(r), "alpha": 0.6, "lw": 1.0,
                  "ls": regularizer_style(r)[1],
                  "label": label if i == 0 else None}
            if pts:
                loss_ax.plot(*zip(*pts, strict=True), **kw)
            eps = [(e["epoch"], 100 * e["val_acc"]) for e in hist.get("epochs", [])
                   if e.get("val_acc") is not None]
            if eps:
                acc_ax.plot(*zip(*eps, strict=True), marker="o", ms=3, **kw)
    loss_ax.set(xlabel="step", ylabel="training loss", title="training loss")
    acc_ax.set(xlabel="epoch", ylabel="val acc %", title="validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(9)
    loss_ax.legend(fontsize=7)
    return fig
