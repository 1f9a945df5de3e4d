"""Figures of the predictor analysis (`attndrift.analysis.predictors`, `.frontier`): the ranking
of the signals by |ρ| with final retention (end of training and early), and the accuracy-
retention frontier a practitioner picks a learning rate from. Registered (`report.base`), runs
in, Figure out, `NoData` when nothing can be shown; no IO.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from attndrift.analysis.frontier import frontier_rows
from attndrift.analysis.predictors import points, predictor_rows
from attndrift.analysis.runs import Run, short_number
from attndrift.report.base import NoData, figure_grid, register_figure
from attndrift.report.style import METHOD_COLORS, legend_outside, lr_shade

RANKING_TITLE = "Which signal predicts forgetting, and how early"
RANKING_CAPTION = (
    "|Spearman ρ| of each tracked signal with the final zero-shot retention, one point per run, "
    "read at the end of training, after epoch 1 and at an early share of training (25% unless "
    "`attndrift report --early-fraction` says otherwise; the table 'Which signal predicts "
    "forgetting, and how early?' names it); whiskers: bootstrap 95% CI over setting cells; "
    "hatched bars: ρ < 0 (more of the signal, less retained). Signals in order of their |ρ| "
    "at the end; one panel per backbone and task.")
FRONTIER_TITLE = "Accuracy-retention frontier"
FRONTIER_CAPTION = (
    "Every setting's test accuracy against its final zero-shot retention (mean ± sd over its "
    "seeds; colour = method, darker = higher lr); the line joins the Pareto set (no setting both "
    "more accurate and more retentive); a ring marks a setting stopped by its guard. One panel "
    "per backbone, dataset and task.")
_WHEN_COLORS = ("#34495e", "#e67e22", "#16a085")


@register_figure("predictor_ranking", RANKING_TITLE, caption=RANKING_CAPTION,
                 section="predictors", order=10, tables=("predictors",))
def predictor_ranking(runs: Sequence[Run]) -> Figure:
    rows = [r for r in predictor_rows(runs) if math.isfinite(r["rho"])]
    if not rows:
        raise NoData("needs 3 completed runs of one backbone with zero-shot retention")
    panels = list(dict.fromkeys((r["model"], r["task"]) for r in rows))
    whens = [w for w, _ in points()]
    n_sig = max(len({r["signal"] for r in rows if (r["model"], r["task"]) == p}) for p in panels)
    fig, axes = figure_grid(len(panels), 1, width=8.5, height=0.28 * n_sig + 1.2)
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        mine = [r for r in rows if (r["model"], r["task"]) == panel]
        end = {r["signal"]: r["abs_rho"] for r in mine if r["when"] == "end"}
        signals = sorted({r["signal"] for r in mine}, key=lambda s: -end.get(s, -1.0))
        height = 0.8 / len(whens)
        for k, when in enumerate(whens):
            by = {r["signal"]: r for r in mine if r["when"] == when}
            y = np.arange(len(signals)) + (k - (len(whens) - 1) / 2) * height
            vals = [by[s]["abs_rho"] if s in by else np.nan for s in signals]
            lo = [by[s]["ci_lo"] if s in by else np.nan for s in signals]
            hi = [by[s]["ci_hi"] if s in by else np.nan for s in signals]
            err = np.vstack([np.nan_to_num(np.subtract(vals, lo)).clip(0),
                             np.nan_to_num(np.subtract(hi, vals)).clip(0)])
            bars = ax.barh(y, np.nan_to_num(vals), height, xerr=err, capsize=1.5,
                           color=_WHEN_COLORS[k], edgecolor="black", lw=0.3, label=when,
                           error_kw={"lw": 0.6})
            for patch, s in zip(bars.patches, signals, strict=True):
                if s in by and by[s]["rho"] < 0:
                    patch.set_hatch("///")
        ax.set_yticks(np.arange(len(signals)), signals, fontsize=7)
        ax.set_ylim(len(signals) - 0.5, -0.5)
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("|Spearman ρ| with final retention", fontsize=8)
        ax.set_title(f"{panel[0]} → {panel[1]}", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    legend_outside(fig, title="read at")
    return fig


@register_figure("frontier", FRONTIER_TITLE, caption=FRONTIER_CAPTION, section="predictors",
                 order=20, tables=("frontier", "selection_utility"))
def accuracy_retention_frontier(runs: Sequence[Run]) -> Figure:
    rows = [r for r in frontier_rows(runs)
            if math.isfinite(r["test_acc"]) and math.isfinite(r["retention"])]
    if not rows:
        raise NoData("needs completed runs with test accuracy and zero-shot retention")
    panels = list(dict.fromkeys((r["model"], r["dataset"], r["task"]) for r in rows))
    cols = min(2, len(panels))
    fig, axes = figure_grid(math.ceil(len(panels) / cols), cols, width=3.6 * cols + 2.0,
                            height=3.2)
    for ax, panel in zip(axes.flat, panels, strict=False):
        mine = [r for r in rows if (r["model"], r["dataset"], r["task"]) == panel]
        for r in mine:
            lrs = sorted({x["lr"] for x in rows if x["_method"] == r["_method"]
                          and math.isfinite(x["lr"])})
            c = METHOD_COLORS.get(str(r["_method"]), "#555555")
            c = lr_shade(c, r["lr"], lrs) if math.isfinite(r["lr"]) and len(lrs) > 1 else c
            ax.errorbar(100 * r["test_acc"], r["retention"],
                        xerr=100 * np.nan_to_num(r["test_acc_sd"]),
                        yerr=np.nan_to_num(r["retention_sd"]), fmt="o", ms=5, color=c,
                        ecolor=c, elinewidth=0.7, capsize=2,
                        label=f"{r['method']} · lr {short_number(r['lr'])}")
            if r["guarded"]:
                ax.plot(100 * r["test_acc"], r["retention"], "o", ms=12, mfc="none",
                        mec="black", lw=1.0, label="stopped by its guard")
        front = sorted((100 * r["test_acc"], r["retention"]) for r in mine if r["pareto"])
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), "-", color="black", lw=0.8, alpha=0.6)
        ax.set_xlabel("test accuracy %", fontsize=8)
        ax.set_ylabel("retention %", fontsize=8)
        ax.set_title(f"{panel[0]} · {panel[1]} → {panel[2]}", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    legend_outside(fig, title="method · lr (darker = higher)")
    return fig
