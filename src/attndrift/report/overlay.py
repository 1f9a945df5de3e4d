"""Attention heatmap overlays: pretrained vs adapted CLS→patch attention on the same probe images.

A run saves ``attention.safetensors`` (the first 8 probe images, uint8 ``[8, 3, H, W]``, and
their CLS→patch maps ``[8, L, heads, N]`` before and after adaptation). `load_attention` reads
it with safetensors' numpy API (no torch); `attention_overlay` is the pure figure function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from attndrift.analysis.common import completed
from attndrift.analysis.runs import Run, dataset_of, lr_of
from attndrift.report.figures import NoData, figure_grid, series_label

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


def overlay_runs(runs: Sequence[Run], limit: int = 3) -> list[Run]:
    """Runs worth overlaying: of the dataset with the most completed runs, one per method
    (its highest learning rate, where drift is largest), at most ``limit``."""
    done = [r for r in completed(runs) if (r.path / ATTENTION_FILE).is_file()]
    if not done:
        return []
    datasets = [dataset_of(r.config) for r in done]
    dataset = max(sorted(set(datasets)), key=datasets.count)
    chosen: dict[str, Run] = {}
    for r in sorted(done, key=lambda r: (-lr_of(r.config), r.config.get("seed", 0))):
        if dataset_of(r.config) == dataset:
            chosen.setdefault(series_label(r), r)
    return [chosen[k] for k in sorted(chosen, key=str.casefold)][:limit]


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


def attention_overlay(samples: Sequence[AttentionSample], layer: int = -1,
                      max_images: int = 4) -> Figure:
    """Rows: probe images. Columns: the image, its pretrained map, then each run's adapted map
    (head mean at ``layer``, upsampled bilinearly over the image; one colour scale per row)."""
    samples = [s for s in samples if s.images.size and np.array_equal(s.images, samples[0].images)]
    if not samples:
        raise NoData("no run saved attention maps (attention.safetensors)")
    n = min(max_images, samples[0].images.shape[0])
    cols = 2 + len(samples)
    fig, axes = figure_grid(n, cols, width=min(11.0, 2.2 * cols), height=2.2)
    n_layers = samples[0].pretrained.shape[1]
    shown_layer = layer % n_layers + 1
    for i in range(n):
        image = np.transpose(samples[0].images[i], (1, 2, 0))
        h, w = image.shape[:2]
        maps = [_grid(samples[0].pretrained[i], layer)] + [_grid(s.final[i], layer)
                                                           for s in samples]
        vmax = max(float(m.max()) for m in maps)
        axes[i, 0].imshow(image, interpolation="nearest")
        titles = ["probe image", "pretrained"] + [f"adapted: {s.label}" for s in samples]
        for j, m in enumerate(maps, start=1):
            ax = axes[i, j]
            ax.imshow(image, interpolation="nearest")
            ax.imshow(m, extent=(0, w, h, 0), cmap="inferno", alpha=0.6, vmin=0, vmax=vmax,
                      interpolation="bilinear")
            ax.text(0.03, 0.04, f"H={_entropy(m):.2f}", transform=ax.transAxes, fontsize=7,
                    color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.5})
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=8)
    fig.suptitle(f"CLS→patch attention, layer {shown_layer} of {n_layers}, mean over heads "
                 "(H = entropy of the shown map, nats)", fontsize=9)
    return fig
