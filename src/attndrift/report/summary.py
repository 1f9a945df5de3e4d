"""Summary figures of 003's index: the statistical summary (Fig. 11), zero-shot per model
(Fig. 15), the one-page dashboard (Fig. 16), and the layer-freezing and LoRA-target comparisons
(003 §3.5, §3.6 extras).

Same contract as `attndrift.report.base` (registered with title and caption). Every bar or
point is the seeds of one setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure

from attndrift.analysis.common import SUBSET_MEAN, completed, final, num, zs, zs_tasks
from attndrift.analysis.runs import Run
from attndrift.analysis.stats import bootstrap_ci, cohens_d
from attndrift.methods import REFERENCE_METHOD, method_spec
from attndrift.report.base import NoData, figure_grid, hbars, register_figure
from attndrift.report.style import (
    REFERENCE,
    ZERO,
    Palette,
    Series,
    drift_reader,
    mean_sd,
    nanmean,
    panel_title,
    series_of,
)


def _val(r: Run) -> float:
    return num(final(r).get("best_val_acc"))


def best_lr(s: Series) -> tuple[float, list[Run]]:
    """The learning rate of a family with the highest mean best validation accuracy (the
    study's model selection; never the test split), and its completed seeds."""
    by_lr = {lr: completed(g) for lr, g in s.by_lr().items()}
    by_lr = {lr: g for lr, g in by_lr.items() if g}
    scored = [(mean_sd(_val(r) for r in g)[0], lr) for lr, g in by_lr.items()]
    scored = [(v if math.isfinite(v) else -math.inf, lr) for v, lr in scored]
    lr = max(scored)[1]
    return lr, by_lr[lr]


def _retention(r: Run) -> float:
    vals = [zs(r, t, "retention_pct") for t in ((r.record or {}).get("zeroshot") or {})]
    return nanmean(vals) if vals else math.nan


@register_figure(
    "dashboard",
    "Dashboard",
    section="summary",
    order=10,
    drift=SUBSET_MEAN,
    tables=("verdict",),
    caption="Each setting family (backbone, dataset, method and its options, regularizer, "
    "other varying keys) at its best learning rate by mean validation accuracy: "
    "test accuracy, Δ entropy, zero-shot retention (mean over transfer tasks) and "
    "Δ head diversity; bars ±1 sd over seeds, clipped to the valid range; dashed "
    "line = pretrained (100% retained) (003 Fig. 16).",
)
def dashboard(runs: Sequence[Run]) -> Figure:
    """003 Fig. 16: per backbone, dataset and setting family at its best learning rate (by
    validation accuracy): test accuracy, Δ entropy, mean zero-shot retention, Δ head diversity."""
    delta = drift_reader(runs)
    done = completed(runs)
    if not done:
        raise NoData("no completed runs")
    pal = Palette(runs)
    rows = []
    all_series = series_of(done, runs)
    for panel, fams in all_series.items():
        for s in fams:
            lr, group = best_lr(s)
            head = panel_title(panel, all_series)
            rows.append(
                (
                    " · ".join(p for p in (head, s.label, f"lr {lr:g}") if p)
                    + f" (n={len(group)})",
                    s.label,
                    group,
                )
            )
    outcomes: list[tuple[str, Callable[[Run], float], float, float]] = [
        ("test acc %", lambda r: 100 * num(final(r).get("test_acc")), 0, 100),
        ("Δ entropy %", lambda r: delta(r, "entropy"), -100, math.inf),
        ("zero-shot retained %\n(task mean)", _retention, 0, math.inf),
        ("Δ head div. %", lambda r: delta(r, "head_diversity"), -100, math.inf),
    ]
    fig, axes = figure_grid(1, len(outcomes), height=max(2.6, 0.26 * len(rows) + 1.3))
    for k, (ax, (name, get, lo, hi)) in enumerate(zip(axes[0], outcomes, strict=True)):
        hbars(
            ax,
            [r[0] for r in rows] if k == 0 else [""] * len(rows),
            [mean_sd(get(r) for r in g) for _, _, g in rows],
            [lab for _, lab, _ in rows],
            pal,
            lo,
            hi,
        )
        if name.startswith("Δ"):
            ax.axvline(0, **ZERO)
        if name.startswith("zero-shot"):
            ax.axvline(100, **REFERENCE)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(
        "Each setting family at its best learning rate (highest mean validation "
        "accuracy); bars: mean ± 1 sd over seeds",
        fontsize=9,
    )
    return fig


@register_figure(
    "statistical_summary",
    "Statistical summary",
    section="statistics",
    order=10,
    drift=SUBSET_MEAN,
    tables=("bootstrap_ci", "run_level"),
    caption="Left: Δ entropy per setting with its percentile bootstrap 95% CI over seeds "
    "(2,000 seeded resamples; settings with ≥ 2 seeds). Right: Cohen's d (pooled "
    "sd) of each setting against the unregularized full-FT setting of the same "
    "backbone, dataset and lr; dotted lines at |d| = 0.2 and 0.8 (003 Fig. 11, §3.2.2).",
)
def statistical_summary(runs: Sequence[Run]) -> Figure:
    """003 Fig. 11: Δ entropy per setting with its bootstrap 95% CI over seeds (003 §3.2.2), and
    Cohen's d of each setting against the panel's unregularized full-FT setting at the same lr."""
    delta = drift_reader(runs)
    done = completed(runs)
    pal = Palette(runs)
    all_series = series_of(done, runs)
    rows, effects = [], []
    for panel, fams in all_series.items():
        head = panel_title(panel, all_series)
        ref = [
            s
            for s in fams
            if s.runs[0].config.get("method") == REFERENCE_METHOD
            and (s.runs[0].config.get("regularizer") or {}).get("name", "none") == "none"
        ]
        ref = max(ref, key=lambda s: len(s.runs)) if ref else None
        for s in fams:
            for lr, group in s.by_lr().items():
                d = [delta(r, "entropy") for r in group]
                d = [v for v in d if math.isfinite(v)]
                if len(d) < 2:
                    continue
                label = " · ".join(p for p in (head, s.label, f"lr {lr:g}") if p)
                ci = bootstrap_ci(d, n_resamples=2000).ci or (math.nan, math.nan)
                rows.append((f"{label} (n={len(d)})", s.label, float(np.mean(d)), ci))
                if ref is not None and s is not ref and lr in ref.by_lr():
                    r_d = [delta(r, "entropy") for r in ref.by_lr()[lr]]
                    es = cohens_d(d, r_d).statistic
                    if math.isfinite(es):
                        effects.append((f"{label} vs {ref.label}", s.label, es))
    if not rows:
        raise NoData("needs a setting with two or more completed seeds")
    cols = 2 if effects else 1
    height = max(2.6, 0.24 * max(len(rows), len(effects)) + 1.3)
    fig, axes = figure_grid(1, cols, height=height, width=11.0 if cols == 2 else 7.5)
    ax = axes[0, 0]
    y = np.arange(len(rows))
    means = np.array([r[2] for r in rows])
    lo = np.array([r[3][0] for r in rows])
    hi = np.array([r[3][1] for r in rows])
    err = np.vstack([np.nan_to_num(means - lo), np.nan_to_num(hi - means)])
    for yi, (_, lab, m, _) in enumerate(rows):
        ax.errorbar(
            m,
            yi,
            xerr=err[:, yi : yi + 1],
            color=pal.color(lab),
            marker=pal.marker(lab),
            ms=4,
            capsize=2,
            ls="",
        )
    ax.axvline(0, **ZERO)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=6 if len(rows) > 30 else 7)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("Δ entropy % (mean, bootstrap 95% CI over seeds)", fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    if effects:
        ax = axes[0, 1]
        y = np.arange(len(effects))
        ax.barh(
            y,
            [e[2] for e in effects],
            0.7,
            color=[pal.color(e[1]) for e in effects],
            edgecolor="black",
            lw=0.4,
        )
        for patch, e in zip(ax.patches, effects, strict=True):
            patch.set_hatch(pal.hatch(e[1]))
        for x in (-0.8, -0.2, 0.2, 0.8):
            ax.axvline(x, color="grey", lw=0.5, ls=(0, (1, 2)))
        ax.axvline(0, **ZERO)
        ax.set_yticks(y, [e[0] for e in effects], fontsize=6 if len(effects) > 30 else 7)
        ax.set_ylim(len(effects) - 0.5, -0.5)
        ax.set_xlabel("Cohen's d of Δ entropy over seeds", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    return fig


@register_figure(
    "zeroshot_per_model",
    "Zero-shot accuracy per model",
    section="results",
    order=110,
    tables=("zeroshot",),
    caption="Zero-shot accuracy of every setting per transfer task, mean ± 1 sd over seeds "
    "(clipped to [0, 100]); dashed = the pretrained model (003 Fig. 15).",
)
def zeroshot_per_model(runs: Sequence[Run]) -> Figure:
    """003 Fig. 15: zero-shot accuracy of every setting per transfer task (mean ± sd over seeds,
    clipped to [0, 100]), with the pretrained accuracy drawn; one row per backbone and dataset."""
    done = completed(runs)
    tasks = zs_tasks(done)
    if not tasks:
        raise NoData("no completed run evaluated zero-shot transfer")
    pal = Palette(runs)
    all_series = series_of(done, runs)
    n_rows = sum(len(s.by_lr()) for fams in all_series.values() for s in fams)
    fig, axes = figure_grid(
        len(all_series),
        len(tasks),
        width=11.0,
        height=max(2.2, 0.22 * n_rows / len(all_series) + 1.1),
    )
    for row, (panel, fams) in enumerate(all_series.items()):
        head = panel_title(panel, all_series)
        settings = [
            (f"{s.label} · lr {lr:g} (n={len(g)})", s.label, g)
            for s in fams
            for lr, g in s.by_lr().items()
        ]
        for col, task in enumerate(tasks):
            ax = axes[row, col]
            hbars(
                ax,
                [t[0] for t in settings] if col == 0 else [""] * len(settings),
                [mean_sd(100 * zs(r, task) for r in g) for _, _, g in settings],
                [lab for _, lab, _ in settings],
                pal,
                0,
                100,
            )
            before = nanmean([100 * zs(r, task, "before") for s in fams for r in s.runs])
            name = task
            if math.isfinite(before):
                ax.axvline(before, **REFERENCE)
                name += f" (pretrained {before:.1f}, dashed)"
            ax.set_title(f"{head}\n{name}" if head else name, fontsize=8)
            ax.set_xlim(0, 100)
            ax.set_xlabel("zero-shot accuracy %", fontsize=8)
    return fig


def _comparison(
    runs: Sequence[Run],
    vary: Callable[[Run], object | None],
    what: str,
    outcomes: Sequence[tuple[str, Callable[[Run], float]]],
    ignore: tuple[str, ...] = ("method", "freeze_layers", "lora.targets"),
) -> Figure:
    """Bars of ``outcomes`` for settings that differ only in what ``vary`` returns (and in the
    ``ignore`` keys, which are what ``vary`` reads)."""
    done = completed(runs)
    pal = Palette(runs)
    groups: dict[tuple, list[tuple[object, str, float, list[Run]]]] = {}
    for panel, fams in series_of(done, runs).items():
        for s in fams:
            v = vary(s.runs[0])
            if v is None:
                continue
            rest = tuple(kv for kv in s.key if kv[0] not in ignore)
            for lr, g in s.by_lr().items():
                groups.setdefault((panel, rest, lr), []).append((v, s.label, lr, g))
    groups = {k: v for k, v in groups.items() if len({x[0] for x in v}) >= 2}
    if not groups:
        raise NoData(f"no settings that differ only in {what}")
    panels = [k[0] for k in groups]
    bars = []
    for (panel, _, _), items in groups.items():
        head = panel_title(panel, panels)
        for _, label, lr, g in sorted(items, key=lambda x: str(x[0])):
            bars.append(
                (
                    " · ".join(p for p in (head, label, f"lr {lr:g}") if p) + f" (n={len(g)})",
                    label,
                    g,
                )
            )
    fig, axes = figure_grid(1, len(outcomes), height=max(2.4, 0.3 * len(bars) + 1.2))
    for k, (ax, (name, get)) in enumerate(zip(axes[0], outcomes, strict=True)):
        hbars(
            ax,
            [b[0] for b in bars] if k == 0 else [""] * len(bars),
            [mean_sd(get(r) for r in g) for _, _, g in bars],
            [lab for _, lab, _ in bars],
            pal,
            0 if "acc" in name else -math.inf,
            100 if "acc" in name else math.inf,
        )
        if name.startswith("Δ"):
            ax.axvline(0, **ZERO)
        ax.set_title(name, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    return fig


def _outcomes(runs: Sequence[Run]) -> tuple[tuple[str, Callable[[Run], float]], ...]:
    delta = drift_reader(runs)
    return (
        ("best val acc %", lambda r: 100 * _val(r)),
        ("Δ entropy %", lambda r: delta(r, "entropy")),
        ("Δ head div. %", lambda r: delta(r, "head_diversity")),
    )


@register_figure(
    "frozen_layers",
    "Layer freezing",
    section="results",
    order=92,
    drift=SUBSET_MEAN,
    caption="Full FT next to freezing the first k layers, everything else equal (mean ± 1 "
    "sd over seeds) (003 §3.5).",
)
def frozen_layers(runs: Sequence[Run]) -> Figure:
    """003 §3.5 (extra figure): full FT next to freezing the first k layers, same setting else."""
    if not any(r.config.get("method") == "freeze" for r in completed(runs)):
        raise NoData("no completed run froze layers (method=freeze)")

    def vary(r: Run) -> object | None:
        m = r.config.get("method")
        return 0 if m == "full_ft" else r.config.get("freeze_layers") if m == "freeze" else None

    return _comparison(runs, vary, "the number of frozen layers", _outcomes(runs))


@register_figure(
    "lora_targets",
    "LoRA target modules",
    section="results",
    order=94,
    drift=SUBSET_MEAN,
    caption="LoRA (and every method on LoRA's target modules, e.g. DoRA) on different "
    "projection sets (e.g. q,v vs q,k,v,o), everything else equal, the method included "
    "(mean ± 1 sd over seeds) (003 §3.6).",
)
def lora_targets(runs: Sequence[Run]) -> Figure:
    """003 §3.6 (extra figure): LoRA on q,v next to LoRA on q,k,v,o (any target sets); the
    same for every method that reads ``lora.targets`` (`attndrift.methods`), never across
    methods."""

    def vary(r: Run) -> object | None:
        spec = method_spec(r.config.get("method"))
        if spec is None or "lora.targets" not in spec.reads:
            return None
        return tuple(sorted((r.config.get("lora") or {}).get("targets") or ()))

    return _comparison(runs, vary, "the LoRA target modules", _outcomes(runs),
                       ignore=("lora.targets",))
