"""Figure: forgetting during training next to attention drift (`attndrift.analysis.forgetting`).

One row per dataset and zero-shot task: zero-shot retention (% of the pretrained accuracy on the
task's fixed subset) and Δ entropy against the share of training, on the same x axis, one line
per setting (mean over its seeds, curves cut to the shortest seed). Runs in, Figure out,
`NoData` when no run tracked zero-shot; no IO.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from attndrift.analysis.forgetting import (
    EARLY_WINDOW,
    entropy_trajectory,
    retention_trajectory,
    tracked_tasks,
)
from attndrift.analysis.runs import (
    Run,
    dataset_of,
    lr_of,
    method_label,
    regularizer_label,
    setting_key,
)
from attndrift.report.figures import NoData

TITLE = "Forgetting during training: zero-shot retention and Δ entropy"
CAPTION = ("Zero-shot retention on a fixed class-balanced subset of each transfer task (left) "
           "and layer-mean Δ entropy (right) at the same points of training, mean over the "
           "seeds of each setting. The shaded band is the early window whose drift the table "
           "'Does early attention drift predict forgetting?' correlates with final retention.")


def _label(run: Run) -> str:
    reg = regularizer_label(run.config)
    return (f"{method_label(run.config)}, lr {lr_of(run.config):g}"
            + ("" if reg == "none" else f", {reg}"))


def _mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    width = min(len(c[0]) for c in curves)
    return (np.nanmean([c[0][:width] for c in curves], axis=0),
            np.nanmean([c[1][:width] for c in curves], axis=0))


def forgetting_dynamics(runs: Sequence[Run]) -> Figure:
    done = [r for r in runs if r.ok and tracked_tasks(r.record)]
    if not done:
        raise NoData("no completed run measured zero-shot during training "
                     "(set probe.zeroshot_every > 0)")
    panels = sorted({(dataset_of(r.config), t) for r in done for t in tracked_tasks(r.record)})
    fig = Figure(figsize=(10, 3.2 * len(panels)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(panels), 2, squeeze=False))
    settings: dict[tuple, list[Run]] = {}
    for r in done:
        settings.setdefault(setting_key(r.config), []).append(r)
    colours = colormaps["tab10"]
    for row, (dataset, task) in enumerate(panels):
        left, right = axes[row]
        groups = [g for g in settings.values()
                  if dataset_of(g[0].config) == dataset and task in tracked_tasks(g[0].record)]
        for i, group in enumerate(sorted(groups, key=lambda g: _label(g[0]))):
            label = _label(group[0]) + (f" (n={len(group)})" if len(group) > 1 else "")
            style = {"color": colours(i % 10), "marker": ".", "ms": 4}
            left.plot(*_mean_curve([retention_trajectory(r.record, task) for r in group]),
                      label=label, **style)
            right.plot(*_mean_curve([entropy_trajectory(r.record) for r in group]), **style)
        for ax, ylabel in ((left, f"zero-shot {task}: retention %"), (right, "Δ entropy %")):
            ax.axvspan(*EARLY_WINDOW, color="grey", alpha=0.15, lw=0)
            ax.set_xlabel("share of training")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{dataset} → {task}", fontsize=9)
            ax.grid(alpha=0.3)
        left.axhline(100, color="grey", lw=0.8)
        right.axhline(0, color="grey", lw=0.8)
        left.legend(fontsize=7)
    return fig
