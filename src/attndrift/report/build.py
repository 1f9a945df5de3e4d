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

from attndrift.analysis import Run, Table, all_tables, load_store, write_csv
from attndrift.analysis.runs import lr_of
from attndrift.report import dynamics, figures, forgetting, overlay
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
    samples = [overlay.load_attention(r.path, f"{figures.series_label(r)}, "
                                               f"lr {lr_of(r.config):g}")
               for r in overlay.overlay_runs(runs)]
    return overlay.attention_overlay([s for s in samples if s is not None])


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("baseline_structure", "Pretrained attention structure",
               "The pretrained model's entropy, ERF@0.95, Gini and head diversity per layer "
               "(layer 1 nearest the input), on each dataset's probe images: the structure "
               "fine-tuning starts from.", figures.baseline_structure),
    FigureSpec("layer_delta_heatmaps", "Per-layer Δ entropy: layers × learning rate",
               "Drift of each layer's CLS→patch entropy vs the pretrained model, mean over "
               "seeds; one panel per dataset and method, rows are learning rates. Blue = "
               "broader attention, red = more concentrated.",
               figures.layer_delta_heatmaps),
    FigureSpec("lr_panels", "Learning-rate panels",
               "Best validation accuracy, Δ entropy and zero-shot accuracy per transfer task "
               "against the learning rate; mean ± sd over seeds (no bar with one seed).",
               figures.lr_panels),
    FigureSpec("trajectories", "Metric trajectories over training: full FT vs LoRA",
               "Drift of the layer-mean metrics at each probe during training, mean over seeds; "
               "colour = method, darker = higher learning rate.",
               dynamics.trajectories),
    FigureSpec("regularization", "Regularization",
               "Δ entropy, ERF and Gini of regularized and weight-decay variants next to the "
               "unregularized run (mean ± sd over seeds).",
               figures.regularization),
    FigureSpec("structure_vs_zeroshot", "Structural change vs zero-shot retention",
               "Each completed run's layer-mean Δ entropy against the share of pretrained "
               "zero-shot accuracy it kept, per transfer task. Correlational, not causal.",
               figures.structure_vs_zeroshot),
    FigureSpec("training_dynamics", "Training dynamics and collapse onset",
               "Δ entropy at each probe for every run that probed (failed and diverged runs up "
               "to where they stopped, marked ×); ▼ marks the collapse onset, the first probe "
               "below -1% (dotted line). Colour = learning rate.",
               dynamics.training_dynamics),
    FigureSpec("forgetting", forgetting.TITLE, forgetting.CAPTION, forgetting.forgetting_dynamics),
    FigureSpec("metric_correlations", "Cross-metric correlations",
               "Pearson r across completed runs between drifts, best validation accuracy and "
               "zero-shot retention (descriptive).",
               figures.metric_correlations),
    FigureSpec("convergence", "Convergence",
               "Training loss per logged step and validation accuracy per epoch of every run "
               "with a history (colour = method).", dynamics.convergence),
    FigureSpec("attention_overlay", "Attention heatmaps: pretrained vs adapted",
               "CLS→patch attention of the last layer (mean over heads) on the same probe "
               "images before and after adaptation, for one run per method (its highest "
               "learning rate) of the most-run dataset; upsampled over the image.", _overlay),
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
    for spec in FIGURES:
        try:
            fig = spec.draw(runs)
        except figures.NoData as why:
            out.append(FigureOut(spec.name, spec.title, spec.caption, None, str(why)))
            continue
        except Exception as err:  # one figure's bug must not cost the whole report
            out.append(FigureOut(spec.name, spec.title, spec.caption, None,
                                 f"error while drawing: {type(err).__name__}: {err}"))
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
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    for t in tables:
        if not t.empty or t.name == "runs":  # the run list is written even for an empty store
            write_csv(t, out_dir / "tables" / f"{t.name}.csv")
    for f in figs:
        if f.png is not None:
            (out_dir / "figures" / f"{f.name}.png").write_bytes(f.png)
    ctx = report_context(runs, tables, figs, store)
    html, md = out_dir / "report.html", out_dir / "report.md"
    html.write_text(render_html(ctx), encoding="utf-8")
    md.write_text(render_markdown(ctx), encoding="utf-8")
    counts = dict(Counter(r.status for r in runs))
    return ReportResult(html, md, counts,
                        [t.name for t in tables if not t.empty or t.name == "runs"],
                        [f.name for f in figs if f.png is not None],
                        time.perf_counter() - t0)
