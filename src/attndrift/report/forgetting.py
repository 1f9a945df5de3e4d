"""Figure: forgetting during training next to attention drift (`attndrift.analysis.forgetting`).

One row per backbone x dataset x zero-shot task: zero-shot retention (% of the pretrained
accuracy on the task's fixed subset) and Δ entropy against the share of training, on the same x
axis, one line per setting (mean over its seeds, curves cut to the shortest seed), in the
report's colours (`style.Palette`: colour = method, shade = lr, line style = regularizer).
Runs in, Figure out, `NoData` when no run tracked zero-shot; no IO.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from attndrift.analysis.common import SUBSET0
from attndrift.analysis.forgetting import (
    EARLY_WINDOW,
    entropy_trajectory,
    retention_trajectory,
    tracked_tasks,
)
from attndrift.analysis.runs import Run
from attndrift.report.base import NoData, figure_grid, mean_curve, register_figure
from attndrift.report.style import (
    REFERENCE,
    ZERO,
    Palette,
    legend_outside,
    lr_shade,
    panel_of,
    panel_title,
    setting_series,
)

TITLE = "Forgetting during training: zero-shot retention and Δ entropy"
CAPTION = ("Zero-shot retention on a fixed class-balanced subset of each transfer task (left) "
           "and layer-mean Δ entropy (right) at the same points of training, mean over the "
           "seeds of each setting; one row per backbone, dataset and task; dashed black = "
           "pretrained (100% retained). The shaded band is the early window whose drift the "
           "table 'Does early attention drift predict forgetting?' correlates with final "
           "retention.")


@register_figure("forgetting", TITLE, caption=CAPTION, section="forgetting", order=10,
                 drift=SUBSET0, tables=("forgetting_dynamics", "early_drift_vs_retention"))
def forgetting_dynamics(runs: Sequence[Run]) -> Figure:
    done = [r for r in runs if r.ok and tracked_tasks(r.record)]
    if not done:
        raise NoData("no completed run measured zero-shot during training "
                     "(set probe.zeroshot_every > 0)")
    pal = Palette(runs)
    panels = setting_series(done, runs)
    # titles name the backbone / dataset where the store has several, tracked or not
    every_panel = {panel_of(r) for r in runs if r.record is not None}
    rows = [(panel, task) for panel, settings in panels.items()
            for task in sorted({t for _, _, g in settings for r in g
                                for t in tracked_tasks(r.record)}, key=str.casefold)]
    fig, axes = figure_grid(len(rows), 2, width=10, height=3.0)
    for row, (panel, task) in enumerate(rows):
        left, right = axes[row]
        head = panel_title(panel, every_panel)
        for s, lr, group in panels[panel]:
            group = [r for r in group if task in tracked_tasks(r.record)]
            if not group:
                continue
            kw = pal.kw(s.label)
            kw["color"] = lr_shade(kw["color"], lr, list(s.by_lr()))
            label = f"{s.label} · lr {lr:g}"
            left.plot(*mean_curve([retention_trajectory(r.record, task) for r in group]),
                      ms=3, lw=1.2, label=label, **kw)
            right.plot(*mean_curve([entropy_trajectory(r.record) for r in group]),
                       ms=3, lw=1.2, label=label, **kw)
        for ax, ylabel in ((left, f"{task}: retention %"), (right, "Δ entropy %")):
            ax.axvspan(*EARLY_WINDOW, color="grey", alpha=0.15, lw=0)
            ax.set_xlabel("share of training", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{head} → {task}" if head else task, fontsize=8)
            ax.grid(alpha=0.3)
        left.axhline(100, **REFERENCE)
        right.axhline(0, **ZERO)
    legend_outside(fig, title="setting · lr (seed mean)")
    return fig
