"""Attention heatmap overlays: pretrained vs adapted CLS→patch attention on the same probe images.

A run saves ``attention.safetensors`` (the first 8 probe images, uint8 ``[8, 3, H, W]``, and
their CLS→patch maps ``[8, L, heads, N]`` before and after adaptation). `load_attention` reads
it with safetensors' numpy API (no torch); `attention_overlay` is the pure figure function.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from attndrift.analysis.common import completed
from attndrift.analysis.runs import Run
from attndrift.report.base import NoData, figure_grid, register_figure
from attndrift.report.style import Series, panel_of, series_of

ATTENTION_FILE = "attention.safetensors"


@dataclass(frozen=True)
class AttentionSample:
    label: str
    images: np.ndarray  # [n, 3, H, W] uint8
    pretrained: np.ndarray  # [n, L, heads, N]
    final: np.ndarray  # [n, L, heads, N]


def load_attention(run_dir: Path, label: str) -> AttentionSample | None:
    """The saved maps of a run, or None when the file is absent or unreadable."""
    path = Path(run_dir) / ATTENTION_FILE
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        t = load_file(str(path))
        return AttentionSample(label, t["images"], t["pretrained"], t["final"])
    except (KeyError, OSError, ValueError, SafetensorError):
        return None


def overlay_runs(runs: Sequence[Run], limit: int = 8) -> list[tuple[Run, str]]:
    """Runs worth overlaying, with their labels: of the backbone and dataset with the most
    completed runs that saved maps, every method at its lowest and highest learning rate (its
    unregularized family with the most runs, lowest seed), then other families (regularized,
    other variants) at their highest lr while fewer than ``limit`` are chosen."""
    done = [r for r in completed(runs) if (r.path / ATTENTION_FILE).is_file()]
    if not done:
        return []
    panels = [panel_of(r) for r in done]
    panel = max(sorted(set(panels)), key=panels.count)
    fams = series_of([r for r in done if panel_of(r) == panel], runs)[panel]

    def rank(s: Series) -> tuple:
        reg = (s.runs[0].config.get("regularizer") or {}).get("name", "none")
        return (reg != "none", -len(s.runs), s.label.casefold())

    def first_seed(group: list[Run]) -> Run:
        return min(group, key=lambda r: (str(r.config.get("seed")), r.run_id))

    chosen: list[tuple[Run, str]] = []
    methods = sorted({str(s.runs[0].config.get("method")) for s in fams})
    for method in methods:
        s = min((s for s in fams if str(s.runs[0].config.get("method")) == method), key=rank)
        by_lr = s.by_lr()
        for lr in sorted({min(by_lr), max(by_lr)}):
            chosen.append((first_seed(by_lr[lr]), f"{s.label} · lr {lr:g}"))
    for s in sorted(fams, key=rank):
        lr = max(s.by_lr())
        run = first_seed(s.by_lr()[lr])
        if len(chosen) >= limit:
            break
        if all(run is not c[0] for c in chosen):
            chosen.append((run, f"{s.label} · lr {lr:g}"))
    return chosen


def _grid(attn: np.ndarray, layer: int) -> np.ndarray:
    """Head-mean CLS→patch map of one image at ``layer`` as a square patch grid."""
    m = attn[layer].mean(axis=0)
    side = math.isqrt(m.size)
    if side * side != m.size:
        raise NoData(f"{m.size} patches do not form a square grid")
    return m.reshape(side, side)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def attention_overlay(
    samples: Sequence[AttentionSample], layer: int = -1, max_images: int = 4
) -> Figure:
    """Rows: probe images. Columns: the image, its pretrained map, then each run's adapted map
    (head mean at ``layer``, one patch per block of pixels, nearest, aligned with the image's
    pixels; one colour scale per row, with its colour bar)."""
    samples = [s for s in samples if s.images.size and np.array_equal(s.images, samples[0].images)]
    if not samples:
        raise NoData("no run saved attention maps (attention.safetensors)")
    n = min(max_images, samples[0].images.shape[0])
    cols = 2 + len(samples)
    width = min(13.0, 1.75 * cols + 0.9)
    fig, axes = figure_grid(n, cols, width=width, height=1.75)
    n_layers = samples[0].pretrained.shape[1]
    shown_layer = layer % n_layers + 1
    chars = max(12, int((width - 0.9) / cols * 72 / (0.55 * 7)))
    titles = ["probe image", "pretrained"] + [textwrap.fill(s.label, chars) for s in samples]
    for i in range(n):
        image = np.transpose(samples[0].images[i], (1, 2, 0))
        h, w = image.shape[:2]
        maps = [_grid(samples[0].pretrained[i], layer)] + [
            _grid(s.final[i], layer) for s in samples
        ]
        vmax = max(float(m.max()) for m in maps)
        axes[i, 0].imshow(image, interpolation="nearest")
        shown = None
        for j, m in enumerate(maps, start=1):
            ax = axes[i, j]
            ax.imshow(image, interpolation="nearest")
            # the image's pixels span [-0.5, w - 0.5]: the patch grid must span the same
            shown = ax.imshow(
                m,
                extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                cmap="inferno",
                alpha=0.65,
                vmin=0,
                vmax=vmax,
                interpolation="nearest",
            )
            ax.text(
                0.03,
                0.04,
                f"H={_entropy(m):.2f}",
                transform=ax.transAxes,
                fontsize=6,
                color="white",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.0},
            )
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=7)
        bar = fig.colorbar(shown, ax=axes[i, :].tolist(), shrink=0.9, pad=0.01, aspect=12)
        bar.ax.tick_params(labelsize=6)
        if i == 0:
            bar.set_label("attention", fontsize=7)
    fig.suptitle(
        f"CLS→patch attention, layer {shown_layer} of {n_layers}, mean over heads "
        "(H = entropy of the shown map, nats; colour scale per row)",
        fontsize=8,
    )
    return fig


@register_figure(
    "attention_overlay",
    "Attention heatmaps: pretrained vs adapted",
    section="results",
    order=130,
    caption="CLS→patch attention of the last layer (mean over heads) on the same probe "
    "images before and after adaptation, for every method at its lowest and highest "
    "learning rate (then other variants at their highest) on the backbone and "
    "dataset with the most runs; one square per patch, colour scale per row.",
)
def overlay_figure(runs: Sequence[Run]) -> Figure:
    """The registered figure: reads the chosen runs' saved maps here, so `attention_overlay`
    itself does no IO."""
    samples = [load_attention(r.path, label) for r, label in overlay_runs(runs)]
    return attention_overlay([s for s in samples if s is not None])
