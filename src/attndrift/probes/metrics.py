"""Attention-map metrics: pure, vectorised functions of CLS->patch attention tensors.

Everything here takes attention distributions whose *last* dimension runs over patches and
reduces that dimension (or, for head diversity, the last two), preserving any leading
batch/layer/head dimensions. There is no IO and no model code, and no Python loop over images,
layers or heads: the whole probe set is scored in one pass.

The definitions are the study's:

- ``entropy``: Shannon entropy in nats of each map.
- ``erf``: effective receptive field, the fraction of patches needed to hold ``mass`` of the
  attention when taking the largest weights first.
- ``gini``: Gini coefficient of the weights (sorted-index formula).
- ``head_diversity``: 1 - mean pairwise cosine similarity between the heads' maps.

``summarize`` turns a ``[n_images, L, H, N]`` tensor into the JSON-able per-layer/per-head
table the reports use, and ``METRICS`` holds the display metadata for each metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.nn.functional as F

__all__ = [
    "ERF_RTOL",
    "METRICS",
    "MetricInfo",
    "delta_pct",
    "entropy",
    "erf",
    "gini",
    "head_diversity",
    "renormalize_patches",
    "summarize",
]

# Relative tolerance on the ERF mass comparison. A cumulative sum that should land exactly on the
# target (e.g. [0.95, 0.05] with mass 0.95) can come out one ulp short in float32, which would
# wrongly demand one more patch; accepting sums within 1e-6 (relative) of the target avoids that.
ERF_RTOL = 1e-6


@dataclass(frozen=True)
class MetricInfo:
    """Display metadata for one metric (used by tables and reports)."""

    name: str
    label: str
    unit: str
    meaning: str


METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        MetricInfo(
            name="entropy",
            label="Attention entropy",
            unit="nats",
            meaning="higher = broader, more diffuse attention",
        ),
        MetricInfo(
            name="erf",
            label="Effective receptive field",
            unit="fraction",
            meaning="higher = 95% of the attention is spread over more of the patches",
        ),
        MetricInfo(
            name="gini",
            label="Gini coefficient",
            unit="",
            meaning="higher = attention concentrated on fewer patches",
        ),
        MetricInfo(
            name="head_diversity",
            label="Head diversity",
            unit="",
            meaning="higher = heads attend to more different patches",
        ),
    )
}


def _as_float(p: torch.Tensor) -> torch.Tensor:
    """Upcast to float32 for the arithmetic; float64 input stays float64.

    Half-precision sums over hundreds of patches lose several digits, and ``log`` of small half
    values underflows, so nothing is computed below float32.
    """
    if p.dtype == torch.float64:
        return p
    return p.to(torch.float32)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of the distributions along the last dimension.

    Args:
        p: ``[..., N]`` non-negative weights, each row summing to 1.

    Returns:
        ``[...]`` entropy, float32 (float64 if ``p`` is float64). Exact zeros contribute 0
        (``torch.special.entr``), so no epsilon is added inside the log.
    """
    return torch.special.entr(_as_float(p)).sum(dim=-1)


def erf(p: torch.Tensor, mass: float = 0.95) -> torch.Tensor:
    """Effective receptive field: fraction of patches holding ``mass`` of the attention.

    For each row, the smallest ``k`` such that the ``k`` largest weights sum to at least
    ``mass`` times the row's total, divided by ``N``. The comparison accepts cumulative sums
    within a relative ``ERF_RTOL`` (1e-6) below the target, so round-off at an exact boundary
    does not cost an extra patch. An all-zero row gives ``1/N``.

    Args:
        p: ``[..., N]`` non-negative weights (need not be normalised).
        mass: target fraction of the total, in ``(0, 1]``.

    Returns:
        ``[...]`` values in ``[1/N, 1]``, float32 (float64 if ``p`` is float64).
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    x = _as_float(p)
    n = x.shape[-1]
    cum = torch.sort(x, dim=-1, descending=True).values.cumsum(dim=-1)
    target = mass * cum[..., -1:] * (1.0 - ERF_RTOL)
    # Entries before the k-th are those whose running sum is still short of the target.
    k = (cum < target).sum(dim=-1) + 1
    return k.clamp(max=n).to(x.dtype) / n


def gini(p: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of the weights along the last dimension (sorted-index formula).

    With ``x`` sorted ascending and ``i = 1..N``:
    ``G = 2 * sum_i(i * x_(i)) / (N * sum_i x_(i)) - (N + 1) / N``.
    Uniform weights give 0, a one-hot row gives ``(N - 1) / N``.

    Args:
        p: ``[..., N]`` non-negative weights.

    Returns:
        ``[...]`` float32 (float64 if ``p`` is float64); NaN for an all-zero row.
    """
    x = torch.sort(_as_float(p), dim=-1).values
    n = x.shape[-1]
    ranks = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)
    weighted = (x * ranks).sum(dim=-1)
    return 2.0 * weighted / (n * x.sum(dim=-1)) - (n + 1) / n


def head_diversity(p: torch.Tensor) -> torch.Tensor:
    """1 - mean pairwise cosine similarity between heads' attention maps.

    Averages over all ``H * (H - 1) / 2`` pairs ``i < j``. With a single head there are no
    pairs; the result is defined as 0. A head whose map is all zero has cosine 0 with every
    other head.

    Args:
        p: ``[..., H, N]`` one map per head.

    Returns:
        ``[...]`` float32 (float64 if ``p`` is float64).
    """
    x = _as_float(p)
    h = x.shape[-2]
    if h < 2:
        return torch.zeros(x.shape[:-2], dtype=x.dtype, device=x.device)
    unit = F.normalize(x, dim=-1)
    gram = unit @ unit.transpose(-1, -2)  # [..., H, H] cosine similarities
    rows, cols = torch.triu_indices(h, h, offset=1, device=x.device)
    return 1.0 - gram[..., rows, cols].mean(dim=-1)


def renormalize_patches(cls_row: torch.Tensor) -> torch.Tensor:
    """Drop the CLS->CLS weight and renormalise the patch weights to sum to 1.

    Args:
        cls_row: ``[..., 1 + N]`` the CLS query's attention over all tokens, CLS first.

    Returns:
        ``[..., N]`` CLS->patch distribution, same dtype as the input.
    """
    patches = cls_row[..., 1:]
    return patches / patches.sum(dim=-1, keepdim=True)


def summarize(cls_patch: torch.Tensor) -> dict[str, Any]:
    """Per-layer and per-head metric table for a whole probe set.

    Args:
        cls_patch: ``[n_images, L, H, N]`` CLS->patch attention, already renormalised.

    Returns:
        A plain-Python (JSON-able) dict::

            {"entropy": {"layers": [L], "heads": [[H] x L]},
             "erf": {...}, "gini": {...},
             "head_diversity": {"layers": [L]},
             "mean": {"entropy": float, "erf": float, "gini": float, "head_diversity": float}}

        Per-head value: mean over images of the per-(image, head) metric. Per-layer value: mean
        over images and heads. Head diversity of a layer: ``head_diversity`` of the ``[H, N]``
        maps obtained by averaging each head's map over the images. ``mean``: mean over layers
        of the per-layer values.
    """
    if cls_patch.dim() != 4:
        raise ValueError(
            f"cls_patch must be [n_images, L, H, N], got shape {tuple(cls_patch.shape)}"
        )
    if cls_patch.shape[0] == 0:
        raise ValueError("cls_patch has no images")
    x = _as_float(cls_patch.detach())
    out: dict[str, Any] = {}
    means: dict[str, float] = {}
    for name, fn in (("entropy", entropy), ("erf", erf), ("gini", gini)):
        per_image_head = fn(x)  # [n, L, H]
        per_layer = per_image_head.mean(dim=(0, 2))
        out[name] = {
            "layers": per_layer.tolist(),
            "heads": per_image_head.mean(dim=0).tolist(),
        }
        means[name] = per_layer.mean().item()
    diversity = head_diversity(x.mean(dim=0))  # [L]
    out["head_diversity"] = {"layers": diversity.tolist()}
    means["head_diversity"] = diversity.mean().item()
    out["mean"] = means
    return out


@overload
def delta_pct(adapted: float, pretrained: float) -> float: ...
@overload
def delta_pct(adapted: torch.Tensor, pretrained: torch.Tensor | float) -> torch.Tensor: ...
@overload
def delta_pct(adapted: float, pretrained: torch.Tensor) -> torch.Tensor: ...


def delta_pct(
    adapted: float | torch.Tensor, pretrained: float | torch.Tensor
) -> float | torch.Tensor:
    """The study's drift: ``100 * (adapted - pretrained) / pretrained``.

    Tensors follow IEEE division (``inf``/``nan`` where ``pretrained`` is 0); plain floats do
    the same instead of raising ``ZeroDivisionError``.
    """
    if isinstance(adapted, torch.Tensor) or isinstance(pretrained, torch.Tensor):
        return 100.0 * (adapted - pretrained) / pretrained
    diff = float(adapted) - float(pretrained)
    if pretrained == 0:
        if diff == 0 or math.isnan(diff):
            return math.nan
        return math.copysign(math.inf, diff) * math.copysign(1.0, float(pretrained))
    return 100.0 * diff / float(pretrained)
