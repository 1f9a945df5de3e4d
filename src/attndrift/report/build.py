"""``attndrift report STORE --out DIR``: records -> tables + statistics + figures -> report.

Writes ``DIR/report.html`` (self-contained: figures embedded as base64 PNG, inline CSS, opens
offline), ``DIR/report.md`` (figures as ``figures/*.png``), ``DIR/tables/*.csv`` (one per table
that has rows) and ``DIR/figures/*.png``. Reads run records and attention maps only: no model
code, no torch.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from attndrift.analysis import Run, Table, all_tables, load_store, resolve_drift, write_csv
from attndrift.analysis.common import SUBSET0
from attndrift.report import dynamics, figures, forgetting, overlay, predictors, summary
from attndrift.report.publish import staged, write_file
from attndrift.report.render import render_html, render_markdown, report_context

DPI = 100


@dataclass(frozen=True)
class FigureSpec:
    name: str
    title: str
    caption: str
    draw: Callable[[Sequence[Run]], Figure]


def _overlay(runs: Sequence[Run]) -> Figure:
    """Reads the chosen runs' saved maps here, so the figure function itself does no IO."""
    samples = [overlay.load_attention(r.path, label) for r, label in overlay.overlay_runs(runs)]
    return overlay.attention_overlay([s for s in samples if s is not None])


_SEEDS = "mean over the seeds of each setting"
# Which drift a figure reads (issue 12 item 3): run-level Δ is the mean over the fixed probe
# subsets of each subset's drift, as 002 reports it; per-layer and over-training values exist
# for probe subset 0 only (the subset probed during training).
_SUBSET_MEAN = " Δ of a run: mean over the fixed probe subsets (002)."
_SUBSET0 = " Per-layer and over-training values: probe subset 0, the subset probed in training."
DRIFT_NOTES = {
    "dashboard": _SUBSET_MEAN,
    "lr_panels": _SUBSET_MEAN,
    "regularization": _SUBSET_MEAN,
    "statistical_summary": _SUBSET_MEAN,
    "structure_vs_zeroshot": _SUBSET_MEAN,
    "frozen_layers": _SUBSET_MEAN,
    "lora_targets": _SUBSET_MEAN,
    "metric_correlations": _SUBSET_MEAN,
    "layer_delta_heatmaps": _SUBSET0,
    "trajectories": _SUBSET0,
    "layer_time_heatmap": _SUBSET0,
    "training_dynamics": _SUBSET0,
    "forgetting": _SUBSET0,
    "gini_evolution": _SUBSET0,
    "erf_evolution": _SUBSET0,
    "accuracy_entropy": _SUBSET0,
}
FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec(
        "dashboard",
        "Dashboard",
        "Each setting family (backbone, dataset, method and its options, regularizer, "
        "other varying keys) at its best learning rate by mean validation accuracy: "
        "test accuracy, Δ entropy, zero-shot retention (mean over transfer tasks) and "
        "Δ head diversity; bars ±1 sd over seeds, clipped to the valid range; dashed "
        "line = pretrained (100% retained) (003 Fig. 16).",
        summary.dashboard,
    ),
    FigureSpec(
        "baseline_structure",
        "Pretrained attention structure",
        "The pretrained model's entropy, ERF@0.95, Gini and head diversity per layer "
        "(layer 1 nearest the input), per backbone and dataset's probe images: the "
        "structure fine-tuning starts from (003 Fig. 2).",
        figures.baseline_structure,
    ),
    FigureSpec(
        "layer_delta_heatmaps",
        "Per-layer Δ entropy: setting × layer",
        f"Drift of each layer's CLS→patch entropy vs the pretrained model, {_SEEDS}; one "
        "panel per backbone and dataset, one row per setting (a family's learning rates "
        "together, families divided by a line). Blue = broader attention, red = more "
        "concentrated; cells unannotated where a number would not fit at 6 pt (values in "
        "per_layer_delta.csv) (003 Fig. 10).",
        figures.layer_delta_heatmaps,
    ),
    FigureSpec(
        "lr_panels",
        "Learning-rate panels",
        "Test accuracy, Δ entropy and zero-shot accuracy per transfer task against the "
        "learning rate; one line per setting family, mean ± 1 sd over seeds (clipped "
        "to the valid range; no bar with one seed); dashed black = pretrained zero-shot "
        "accuracy (003 Fig. 6).",
        figures.lr_panels,
    ),
    FigureSpec(
        "accuracy_entropy",
        "Accuracy and entropy over training",
        f"Validation accuracy per epoch and layer-mean entropy at each probe, {_SEEDS}, each "
        "setting family at its best learning rate (by validation accuracy); a pair of panels "
        "per backbone and dataset on one epoch axis (003 Fig. 3 drew them on twin y axes).",
        dynamics.accuracy_entropy,
    ),
    FigureSpec(
        "trajectories",
        "Metric trajectories over training",
        f"Drift of the layer-mean metrics at each probe during training, {_SEEDS}; "
        "colour = method (shade = variant, darker = higher lr), line style = "
        "regularizer (003 Fig. 5, Fig. 9).",
        dynamics.trajectories,
    ),
    FigureSpec(
        "layer_time_heatmap",
        "Layer × training-time entropy",
        f"Per-layer Δ entropy at each probe, {_SEEDS}, for every setting family at its "
        "highest learning rate (003 Fig. 4).",
        dynamics.layer_time_heatmap,
    ),
    FigureSpec(
        "gini_evolution",
        "Gini over training",
        f"Layer-mean Gini coefficient at each probe, {_SEEDS}; dashed black = "
        "pretrained (003 Fig. 17).",
        dynamics.gini_evolution,
    ),
    FigureSpec(
        "erf_evolution",
        "ERF over training",
        f"Layer-mean effective receptive field (ERF@0.95) at each probe, {_SEEDS}; "
        "dashed black = pretrained (003 Fig. 17's companion).",
        dynamics.erf_evolution,
    ),
    FigureSpec(
        "regularization",
        "Regularization",
        "Δ entropy, ERF and Gini of regularized and weight-decay variants next to the "
        "setting that differs from them only in that, at the same learning rate (mean "
        "± 1 sd over seeds) (003 Fig. 8).",
        figures.regularization,
    ),
    FigureSpec(
        "frozen_layers",
        "Layer freezing",
        "Full FT next to freezing the first k layers, everything else equal (mean ± 1 "
        "sd over seeds) (003 §3.5).",
        summary.frozen_layers,
    ),
    FigureSpec(
        "lora_targets",
        "LoRA target modules",
        "LoRA on different projection sets (e.g. q,v vs q,k,v,o), everything else equal "
        "(mean ± 1 sd over seeds) (003 §3.6).",
        summary.lora_targets,
    ),
    FigureSpec(
        "statistical_summary",
        "Statistical summary",
        "Left: Δ entropy per setting with its percentile bootstrap 95% CI over seeds "
        "(2,000 seeded resamples; settings with ≥ 2 seeds). Right: Cohen's d (pooled "
        "sd) of each setting against the unregularized full-FT setting of the same "
        "backbone, dataset and lr; dotted lines at |d| = 0.2 and 0.8 (003 Fig. 11, §3.2.2).",
        summary.statistical_summary,
    ),
    FigureSpec(
        "structure_vs_zeroshot",
        "Structural change vs zero-shot retention",
        "Each completed run's layer-mean Δ entropy against the share of pretrained "
        "zero-shot accuracy it kept, per transfer task, one row per backbone and "
        "dataset. Correlational, not causal (003 Fig. 7).",
        figures.structure_vs_zeroshot,
    ),
    FigureSpec(
        "zeroshot_per_model",
        "Zero-shot accuracy per model",
        "Zero-shot accuracy of every setting per transfer task, mean ± 1 sd over seeds "
        "(clipped to [0, 100]); dashed = the pretrained model (003 Fig. 15).",
        summary.zeroshot_per_model,
    ),
    FigureSpec(
        "training_dynamics",
        "Training dynamics and collapse onset",
        "Δ entropy at each probe for every run that probed (failed and diverged runs up "
        "to where they stopped, marked ×); ▼ marks the collapse onset, the first probe "
        "below -1% (dotted line). Colour = setting family, darker = higher lr "
        "(003 Fig. 12).",
        dynamics.training_dynamics,
    ),
    FigureSpec("forgetting", forgetting.TITLE, forgetting.CAPTION, forgetting.forgetting_dynamics),
    FigureSpec("predictor_ranking", predictors.RANKING_TITLE, predictors.RANKING_CAPTION,
               predictors.predictor_ranking),
    FigureSpec("frontier", predictors.FRONTIER_TITLE, predictors.FRONTIER_CAPTION,
               predictors.accuracy_retention_frontier),
    FigureSpec(
        "metric_correlations",
        "Cross-metric correlations",
        "Pearson r across all completed runs (pooled over settings, as 003 §3.10) "
        "between drifts, best validation accuracy and zero-shot retention "
        "(descriptive) (003 Fig. 13).",
        figures.metric_correlations,
    ),
    FigureSpec(
        "convergence",
        "Convergence",
        "Training loss per logged step and validation accuracy per epoch of every run "
        "with a history, one row per backbone and dataset; colour = setting family, "
        "darker = higher lr, marker = seed; a black ring marks a run whose last three "
        "epochs of validation accuracy vary by sd ≥ 0.005 (not converged, 003 §4.5) "
        "(003 Fig. 14).",
        dynamics.convergence,
    ),
    FigureSpec(
        "attention_overlay",
        "Attention heatmaps: pretrained vs adapted",
        "CLS→patch attention of the last layer (mean over heads) on the same probe "
        "images before and after adaptation, for every method at its lowest and highest "
        "learning rate (then other variants at their highest) on the backbone and "
        "dataset with the most runs; one square per patch, colour scale per row.",
        _overlay,
    ),
)


@dataclass(frozen=True)
class FigureOut:
    name: str
    title: str
    caption: str
    png: bytes | None
    skipped: str | None = None


@dataclass(frozen=True)
class ReportResult:
    html: Path
    markdown: Path
    counts: dict[str, int]
    tables: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def draw_figures(runs: Sequence[Run]) -> list[FigureOut]:
    out = []
    on_subset0 = resolve_drift(runs) == SUBSET0
    for spec in FIGURES:
        note = DRIFT_NOTES.get(spec.name, "")
        if on_subset0 and note == _SUBSET_MEAN:
            note = " Δ of a run: probe subset 0 (these records have no subset means)."
        spec = FigureSpec(spec.name, spec.title, spec.caption + note, spec.draw)
        try:
            fig = spec.draw(runs)
        except figures.NoData as why:
            out.append(FigureOut(spec.name, spec.title, spec.caption, None, str(why)))
            continue
        except Exception as err:  # one figure's bug must not cost the whole report
            out.append(
                FigureOut(
                    spec.name,
                    spec.title,
                    spec.caption,
                    None,
                    f"error while drawing: {type(err).__name__}: {err}",
                )
            )
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        out.append(FigureOut(spec.name, spec.title, spec.caption, buf.getvalue()))
    return out


def build_report(store: Path, out_dir: Path) -> ReportResult:
    """Read every run under ``store`` and write the report to ``out_dir``."""
    t0 = time.perf_counter()
    store, out_dir = Path(store), Path(out_dir)
    runs = load_store(store)
    tables: list[Table] = all_tables(runs, str(store))
    figs = draw_figures(runs)
    ctx = report_context(runs, tables, figs, store)
    html, md = out_dir / "report.html", out_dir / "report.md"
    with staged(out_dir) as stage:
        (stage / "tables").mkdir()
        (stage / "figures").mkdir()
        for t in tables:
            if not t.empty or t.name == "runs":  # the run list is written even for an empty store
                path = stage / "tables" / f"{t.name}.csv"
                try:
                    write_csv(t, path)
                except OSError as err:
                    raise OSError(err.errno, err.strerror, str(err.filename or path)) from err
        for f in figs:
            if f.png is not None:
                write_file(stage / "figures" / f"{f.name}.png", f.png)
        write_file(stage / md.name, render_markdown(ctx))
        write_file(stage / html.name, render_html(ctx))
    counts = dict(Counter(r.status for r in runs))
    return ReportResult(
        html,
        md,
        counts,
        [t.name for t in tables if not t.empty or t.name == "runs"],
        [f.name for f in figs if f.png is not None],
        time.perf_counter() - t0,
    )
