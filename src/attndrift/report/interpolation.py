"""Figure: the WiSE-FT / LoRA-scaling walks of ``attndrift interpolate`` (issue 22 item 5).

One panel per backbone × dataset: task (test) accuracy against zero-shot accuracy (mean over
the transfer tasks) at each alpha, one line per setting (seed mean), the pretrained end
(alpha 0) an open marker and the fine-tuned end (alpha 1) a filled one. Registered, runs in,
Figure out, `NoData` when no run was walked; the files are read by
`attndrift.analysis.interpolation`.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from attndrift.analysis.interpolation import walked_settings
from attndrift.analysis.runs import Run, short_number
from attndrift.report.base import NoData, figure_grid, register_figure
from attndrift.report.style import (
    Palette,
    family_key,
    family_labels,
    legend_outside,
    panel_of,
    panel_title,
)


@register_figure(
    "interpolation",
    "Interpolation: task accuracy against zero-shot",
    section="interpolation",
    order=10,
    tables=("interpolation",),
    caption="Each walked setting from its pretrained encoder (alpha 0, open circle) to the "
    "fine-tuned model (alpha 1, filled square) with `attndrift interpolate`: WiSE-FT weight "
    "interpolation for full FT and freezing, the LoRA delta scaled by alpha for LoRA "
    "(Wortsman et al., 2022); test accuracy on the fine-tuning task (the fine-tuned head at "
    "every alpha) against zero-shot accuracy (mean over transfer tasks), mean over seeds; "
    "one panel per backbone and dataset. A curve bowing up and right keeps transfer for "
    "little accuracy.",
)
def interpolation(runs: Sequence[Run]) -> Figure:
    walked = walked_settings(runs)
    if not walked:
        raise NoData("no run has an interpolation.json (run `attndrift interpolate RUN_DIR`)")
    pal = Palette(runs)
    labels = family_labels(runs)
    panels: dict[tuple[str, str], list] = {}
    for s, points in walked:
        panels.setdefault(panel_of(s.runs[0]), []).append((s, points))
    cols = min(len(panels), 2)
    fig, axes = figure_grid(-(-len(panels) // cols), cols, width=4.6 * cols + 3.2, height=3.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (panel, items) in zip(axes.flat, sorted(panels.items()), strict=False):
        for s, points in items:
            fam = labels.get(family_key(s.runs[0]), s.label)
            kw = pal.kw(fam)
            x = [100 * p["zs_mean"] for p in points]
            y = [100 * p["test_acc"] for p in points]
            lr = s.config.get("train", {}).get("lr")
            ax.plot(x, y, label=f"{fam} · lr {short_number(lr)}" if lr is not None else fam,
                    **{**kw, "marker": "."})
            ends = {p["alpha"]: (xa, ya) for p, xa, ya in zip(points, x, y, strict=True)}
            if 0.0 in ends:
                ax.plot(*ends[0.0], "o", ms=7, mfc="white", mec=kw["color"])
            if 1.0 in ends:
                ax.plot(*ends[1.0], "s", ms=7, color=kw["color"])
        ax.set_xlabel("zero-shot accuracy % (task mean)", fontsize=8)
        ax.set_ylabel("test accuracy %", fontsize=8)
        ax.set_title(panel_title(panel, panels) or "walked runs", fontsize=9)
        ax.grid(alpha=0.3)
    legend_outside(fig, title="setting (○ pretrained, ■ fine-tuned)")
    return fig

