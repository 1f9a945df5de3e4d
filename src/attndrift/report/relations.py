"""How outcomes relate: test accuracy against zero-shot retention (the trade-off the summary
answers), structural change against retention, and the cross-metric correlations. Same contract
as `attndrift.report.base`: registered, runs in, Figure out, `NoData` when nothing to show.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from attndrift.analysis.common import SUBSET_MEAN, completed, final, num, zs, zs_tasks
from attndrift.analysis.inference import outcome_columns
from attndrift.analysis.runs import Run
from attndrift.analysis.stats import correlation_matrix
from attndrift.report.base import NoData, clipped_yerr, figure_grid, register_figure
from attndrift.report.style import (
    REFERENCE,
    ZERO,
    Palette,
    drift_reader,
    legend_outside,
    mean_sd,
    nanmean,
    not_available,
    panel_title,
    series_of,
)
from attndrift.report.summary import best_lr


def retention(run: Run) -> float:
    """A run's zero-shot retention %, averaged over its transfer tasks."""
    vals = [zs(run, t, "retention_pct") for t in ((run.record or {}).get("zeroshot") or {})]
    return nanmean(vals) if vals else math.nan


def _test_acc(run: Run) -> float:
    return 100 * num(final(run).get("test_acc"))


@register_figure(
    "accuracy_retention",
    "Accuracy against retained transfer",
    section="summary",
    order=20,
    tables=("verdict", "matched_lr"),
    caption="What each setting buys and costs: test accuracy on the fine-tuning task (x) against "
    "zero-shot accuracy kept on the transfer tasks (y, % of the pretrained model's, mean over "
    "tasks), mean ± 1 sd over seeds; one panel per backbone and dataset, a family's learning "
    "rates joined by a line in lr order, its best learning rate by validation accuracy "
    "ringed in black. Up and right is better; dashed = pretrained "
    "(100% retained).",
)
def accuracy_retention(runs: Sequence[Run]) -> Figure:
    """Test accuracy vs mean zero-shot retention, one point per setting (seed mean)."""
    done = completed(runs)
    if not zs_tasks(done):
        raise NoData("no completed run evaluated zero-shot transfer")
    pal = Palette(runs)
    panels = series_of(done, runs)
    cols = min(len(panels), 2)
    fig, axes = figure_grid(math.ceil(len(panels) / cols), cols, width=4.6 * cols + 3.2,
                            height=3.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (panel, fams) in zip(axes.flat, panels.items(), strict=False):
        for s in fams:
            pts = []
            for lr, group in sorted(s.by_lr().items()):
                acc, ret = mean_sd(map(_test_acc, group)), mean_sd(map(retention, group))
                if math.isfinite(acc[0]) and math.isfinite(ret[0]):
                    pts.append((lr, acc, ret))
            if not pts:
                continue
            x = [p[1][0] for p in pts]
            y = [p[2][0] for p in pts]
            ax.errorbar(x, y, xerr=clipped_yerr(x, [p[1][1] for p in pts], 0, 100),
                        yerr=clipped_yerr(y, [p[2][1] for p in pts], 0, math.inf), ms=5,
                        capsize=2, label=s.label, **pal.kw(s.label))
            best = best_lr(s)[0]
            for lr, (xa, _, _), (ya, _, _) in pts:
                if lr == best:
                    ax.plot([xa], [ya], "o", ms=11, mfc="none", mec="black", mew=1.2)
        if not ax.lines:
            not_available(ax)
        ax.axhline(100, label="pretrained (100%)", **REFERENCE)
        ax.set_xlabel("test accuracy %", fontsize=8)
        ax.set_ylabel("zero-shot retained % (task mean)", fontsize=8)
        ax.set_title(panel_title(panel, panels) or "all runs", fontsize=9)
        ax.grid(alpha=0.3)
    legend_outside(fig, title="setting (±1 sd over seeds; ○ = best lr)")
    return fig


@register_figure(
    "structure_vs_zeroshot",
    "Structural change vs zero-shot retention",
    section="statistics",
    order=50,
    drift=SUBSET_MEAN,
    tables=("transfer_retention",),
    caption="Each completed run's layer-mean Δ entropy against the share of pretrained "
    "zero-shot accuracy it kept, per transfer task, one row per backbone and "
    "dataset. Correlational, not causal (003 Fig. 7).",
)
def structure_vs_zeroshot(runs: Sequence[Run]) -> Figure:
    """Δ entropy against zero-shot retention per transfer task, one point per run, one row per
    backbone and dataset (retention is not pooled across datasets)."""
    delta = drift_reader(runs)
    done = completed(runs)
    tasks = zs_tasks(done)
    if not tasks:
        raise NoData("no completed run evaluated zero-shot transfer")
    pal = Palette(runs)
    panels = series_of(done, runs)
    fig, axes = figure_grid(
        len(panels), len(tasks), width=min(11.0, 4.2 * len(tasks) + 2.5), height=3.2
    )
    for row, (panel, fams) in enumerate(panels.items()):
        head = panel_title(panel, panels)
        for ax, task in zip(axes[row], tasks, strict=True):
            for s in fams:
                pts = [(delta(r, "entropy"), zs(r, task, "retention_pct")) for r in s.runs]
                pts = [p for p in pts if all(map(math.isfinite, p))]
                if pts:
                    ax.scatter(
                        *zip(*pts, strict=True),
                        s=22,
                        alpha=0.85,
                        color=pal.color(s.label),
                        marker=pal.marker(s.label),
                        label=s.label,
                    )
            if not ax.collections:
                not_available(ax)
            ax.axvline(0, **ZERO)
            ax.axhline(100, label="pretrained (100%)", **REFERENCE)
            ax.set_xlabel("Δ entropy % (layer mean)", fontsize=8)
            ax.set_ylabel(f"{task}: retained %", fontsize=8)
            if head:
                ax.set_title(head, fontsize=9)
            ax.grid(alpha=0.3)
    legend_outside(fig, title="setting (one point per run)")
    return fig


@register_figure(
    "metric_correlations",
    "Cross-metric correlations",
    section="statistics",
    order=70,
    drift=SUBSET_MEAN,
    tables=("metric_correlations",),
    caption="Pearson r across all completed runs (pooled over settings, as 003 §3.10) "
    "between drifts, best validation accuracy and zero-shot retention "
    "(descriptive) (003 Fig. 13).",
)
def metric_correlations(runs: Sequence[Run]) -> Figure:
    """Pearson correlations across completed runs of drift, accuracy and retention."""
    data = {
        k: v
        for k, v in outcome_columns(runs).items()
        if np.isfinite(np.asarray(v, dtype=float)).sum() >= 3
    }
    if len(completed(runs)) < 3 or len(data) < 2:
        raise NoData("needs three or more completed runs")
    cm = correlation_matrix(data)
    k = len(cm.names)
    fig, axes = figure_grid(1, 1, width=min(9.0, 0.9 * k + 3.5), height=min(8.0, 0.75 * k + 2))
    ax = axes[0, 0]
    image = ax.imshow(cm.r, cmap="RdBu", vmin=-1, vmax=1)
    size = 7 if k <= 10 else 6
    ax.set_xticks(range(k), cm.names, rotation=90, fontsize=size + 1)
    ax.set_yticks(range(k), cm.names, fontsize=size + 1)
    if k <= 14:
        for (i, j), v in np.ndenumerate(cm.r):
            ax.text(
                j,
                i,
                "—" if not math.isfinite(v) else f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=size,
                color="white" if math.isfinite(v) and abs(v) > 0.6 else "black",
            )
    fig.colorbar(image, ax=ax, shrink=0.8, label="Pearson r")
    return fig
