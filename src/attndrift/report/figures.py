"""The report's structure figures: one function per figure, runs in, matplotlib Figure out.

No IO and no pyplot state: each function builds a `matplotlib.figure.Figure` (rendered by Agg
when saved). A figure whose data the runs do not hold raises `NoData` with the reason, which
the report shows instead of the figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from attndrift.analysis.common import completed, delta, final, num, zs, zs_tasks
from attndrift.analysis.inference import outcome_columns
from attndrift.analysis.metadata import SHORT, core_metrics, metric_info
from attndrift.analysis.runs import Run, dataset_of, lr_of, method_label, regularizer_label
from attndrift.analysis.stats import correlation_matrix
from attndrift.analysis.tables import regularization as regularization_table

_COLORS = {"full_ft": "#c0392b", "lora": "#2471a3", "freeze": "#229954",
           "linear_probe": "#7d3c98"}


class NoData(Exception):
    """The runs hold nothing this figure can show; ``str()`` says why."""


_MARKERS = {"none": "o", "apr": "^", "entropy_floor": "s", "l2sp": "D"}


def method_color(run: Run) -> str:
    return _COLORS.get(run.config.get("method", ""), "#555555")


def regularizer_style(run: Run) -> tuple[str, str]:
    """(marker, linestyle): regularized runs share their method's colour, so they differ here."""
    reg = run.config.get("regularizer") or {}
    name = reg.get("name", "none") if isinstance(reg, dict) else "none"
    return _MARKERS.get(name, "P"), "-" if name == "none" else "--"


def series_label(run: Run) -> str:
    """Method, plus the regularizer when there is one."""
    reg = regularizer_label(run.config)
    return method_label(run.config) + ("" if reg == "none" else f" + {reg}")


def figure_grid(rows: int, cols: int, width: float = 11.0,
                height: float = 2.9) -> tuple[Figure, np.ndarray]:
    """A pyplot-free figure with a ``[rows, cols]`` array of axes; ``height`` is per row."""
    fig = Figure(figsize=(width, height * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def grouped(runs: Sequence[Run], key: Callable[[Run], Any]) -> dict[Any, list[Run]]:
    """Runs grouped by ``key``, groups in sorted key order (labels case-insensitively, so
    "full FT" comes before "LoRA" as in the study's tables)."""
    out: dict[Any, list[Run]] = {}
    for r in runs:
        out.setdefault(key(r), []).append(r)

    def fold(k: Any) -> Any:
        parts = k if isinstance(k, tuple) else (k,)
        return tuple(p.casefold() if isinstance(p, str) else p for p in parts)

    return dict(sorted(out.items(), key=lambda kv: fold(kv[0])))


def baseline_structure(runs: Sequence[Run]) -> Figure:
    """The pretrained model's four metrics per layer, one line per probe set (dataset)."""
    bases = {}
    for r in completed(runs):
        base = (r.record or {}).get("baseline") or {}
        if base.get("entropy"):
            bases.setdefault((r.config.get("model"), dataset_of(r.config)), base)
    if not bases:
        raise NoData("no completed run has a pretrained baseline")
    info = metric_info()
    fig, axes = figure_grid(1, len(info), height=3.0)
    for ax, m in zip(axes[0], info, strict=True):
        for (model, dataset), base in bases.items():
            layers = (base.get(m) or {}).get("layers") or []
            ax.plot(range(1, len(layers) + 1), layers, marker="o", ms=3,
                    label=f"{dataset}" if len({b[0] for b in bases}) == 1 else
                    f"{model}: {dataset}")
        ax.set_title(info[m].label, fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel(info[m].unit or "value")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, title="probe images", title_fontsize=7)
    return fig


def layer_delta_heatmaps(runs: Sequence[Run], metric: str = "entropy") -> Figure:
    """Per-layer drift (seed mean), layers × learning rate, one panel per dataset and method."""
    panels = grouped(completed(runs), lambda r: (dataset_of(r.config), series_label(r)))
    panels = {k: v for k, v in panels.items()
              if any(final(r).get("delta_pct_layers", {}).get(metric) for r in v)}
    if not panels:
        raise NoData("no completed run has per-layer drift")
    grids = {}
    for key, group in panels.items():
        lrs = sorted({lr_of(r.config) for r in group})
        rows = []
        for lr in lrs:
            vals = [final(r)["delta_pct_layers"].get(metric) or [] for r in group
                    if lr_of(r.config) == lr]
            width = min(len(v) for v in vals)
            rows.append(np.nanmean([[num(x) for x in v[:width]] for v in vals], axis=0))
        width = min(len(r) for r in rows)
        grids[key] = (lrs, np.array([r[:width] for r in rows]))
    span = max(float(np.nanmax(np.abs(g))) for _, g in grids.values()) or 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
    cols = min(4, len(grids))
    nrows = math.ceil(len(grids) / cols)
    fig, axes = figure_grid(nrows, cols, width=min(11.0, 3.0 * cols + 1.5),
                        height=0.45 * max(len(v[0]) for v in grids.values()) + 1.6)
    for ax in axes.flat[len(grids):]:
        ax.set_visible(False)
    image = None
    for ax, ((dataset, label), (lrs, grid)) in zip(axes.flat, grids.items(), strict=False):
        image = ax.imshow(grid, cmap="RdBu", norm=norm, aspect="auto")
        ax.set_title(f"{dataset}\n{label}", fontsize=9)
        ax.set_xticks(range(grid.shape[1]), [str(i + 1) for i in range(grid.shape[1])],
                      fontsize=7)
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("lr", fontsize=8)
        if grid.size <= 80:
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 * span else "black")
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"Δ {SHORT.get(metric, metric)} % per layer")
    return fig


def lr_panels(runs: Sequence[Run]) -> Figure:
    """Accuracy, Δ entropy and zero-shot vs learning rate: mean ± sd over seeds per method."""
    done = completed(runs)
    tasks = zs_tasks(done)
    series = grouped(done, lambda r: (dataset_of(r.config), series_label(r)))
    series = {k: v for k, v in series.items() if len({lr_of(r.config) for r in v}) >= 2}
    if not series:
        raise NoData("no method was run at two or more learning rates")
    datasets = sorted({k[0] for k in series})
    outcomes = [("best val acc %", lambda r: 100 * num(final(r).get("best_val_acc"))),
                ("Δ entropy %", lambda r: delta(r, "entropy"))]
    outcomes += [(f"zero-shot {t} %", lambda r, t=t: 100 * zs(r, t)) for t in tasks]
    all_lrs = sorted({lr_of(r.config) for g in series.values() for r in g})
    fig, axes = figure_grid(len(datasets), len(outcomes), height=2.8)
    for (dataset, label), group in series.items():
        row = datasets.index(dataset)
        lrs = sorted({lr_of(r.config) for r in group})
        for col, (name, get) in enumerate(outcomes):
            vals = [[get(r) for r in group if lr_of(r.config) == lr] for lr in lrs]
            mean = [np.nanmean(v) for v in vals]
            sd = [np.nanstd(v, ddof=1) if len(v) > 1 else 0.0 for v in vals]
            ax = axes[row, col]
            marker, style = regularizer_style(group[0])
            ax.errorbar(lrs, mean, yerr=sd, marker=marker, ms=4, capsize=3, label=label,
                        color=method_color(group[0]), linestyle=style)
            ax.set_xscale("log")
            ax.set_xticks(all_lrs, [f"{lr:g}" for lr in all_lrs], fontsize=7,
                          rotation=30 if len(all_lrs) > 3 else 0)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{dataset}: {name}" if len(datasets) > 1 else name, fontsize=9)
            ax.set_xlabel("learning rate", fontsize=8)
            ax.grid(alpha=0.3)
            if name.startswith("Δ"):
                ax.axhline(0, color="grey", lw=0.8)
    for row in range(len(datasets)):
        axes[row, 0].legend(fontsize=7)
    return fig


def regularization(runs: Sequence[Run]) -> Figure:
    """Drift of entropy, ERF and Gini per regularization setting, next to no regularizer."""
    table = regularization_table(runs)
    if table.empty:
        raise NoData(table.skipped or "no regularization runs")
    metrics = [m for m in ("entropy", "erf", "gini") if m in core_metrics()]
    labels = [f"{r['regularizer']}" + (f" ({r['other']})" if r["other"] != "—" else "")
              + f"\n{r['dataset']}, {r['method']}, lr {r['lr']:g}" for r in table.rows]
    fig, axes = figure_grid(1, 1, height=max(3.0, 0.45 * len(labels) * len(metrics) / 2))
    ax = axes[0, 0]
    y = np.arange(len(labels))
    h = 0.8 / len(metrics)
    for k, m in enumerate(metrics):
        ax.barh(y + k * h, [r[f"d_{m}"] for r in table.rows], h,
                xerr=[0 if not math.isfinite(num(r.get(f"d_{m}_sd"))) else r[f"d_{m}_sd"]
                      for r in table.rows], label=f"Δ {SHORT[m]} %")
    ax.set_yticks(y + h * (len(metrics) - 1) / 2, labels, fontsize=7)
    ax.axvline(0, color="grey", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("drift vs pretrained (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="x")
    return fig


def structure_vs_zeroshot(runs: Sequence[Run]) -> Figure:
    """Δ entropy against zero-shot retention per transfer task, one point per run."""
    done = completed(runs)
    tasks = zs_tasks(done)
    if not tasks:
        raise NoData("no completed run evaluated zero-shot transfer")
    fig, axes = figure_grid(1, len(tasks), width=min(11.0, 4.2 * len(tasks)), height=3.4)
    for ax, task in zip(axes[0], tasks, strict=True):
        for label, group in grouped(done, series_label).items():
            ax.scatter([delta(r, "entropy") for r in group],
                       [zs(r, task, "retention_pct") for r in group], s=22, alpha=0.8,
                       color=method_color(group[0]), marker=regularizer_style(group[0])[0],
                       label=label)
        ax.axvline(0, color="grey", lw=0.8)
        ax.axhline(100, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("Δ entropy % (layer mean)")
        ax.set_ylabel(f"{task}: retained %")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return fig


def metric_correlations(runs: Sequence[Run]) -> Figure:
    """Pearson correlations across completed runs of drift, accuracy and retention."""
    data = {k: v for k, v in outcome_columns(runs).items()
            if np.isfinite(np.asarray(v, dtype=float)).sum() >= 3}
    if len(completed(runs)) < 3 or len(data) < 2:
        raise NoData("needs three or more completed runs")
    cm = correlation_matrix(data)
    k = len(cm.names)
    fig, axes = figure_grid(1, 1, width=min(8.0, 1.1 * k + 2.5), height=min(7.0, 0.9 * k + 1.5))
    ax = axes[0, 0]
    image = ax.imshow(cm.r, cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(k), cm.names, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(k), cm.names, fontsize=8)
    for (i, j), v in np.ndenumerate(cm.r):
        ax.text(j, i, "—" if not math.isfinite(v) else f"{v:.2f}", ha="center", va="center",
                fontsize=7, color="white" if math.isfinite(v) and abs(v) > 0.6 else "black")
    fig.colorbar(image, ax=ax, shrink=0.8, label="Pearson r")
    return fig
