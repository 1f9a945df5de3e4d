"""Attention-map metrics (003 §1.4): pure, vectorised torch functions of CLS->patch attention.

Each function reduces the *last* dimension (patches; for head diversity the last two), keeping
any leading batch/layer/head dimensions: no IO, no model code, no Python loop over images,
layers or heads, and the same torch code on every device. ``summarize`` scores a whole probe
set, sorting each row once for both ERF and Gini (``_Sorted``), into the JSON-able
per-layer/per-head table the reports use. Which metrics exist, and their display metadata,
is declared in `attndrift.signals` (``METRICS`` here is its ``ATTENTION``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from attndrift.signals import ATTENTION, Signal, drift_pct

__all__ = [
    "METRICS",
    "PER_LAYER",
    "PER_MAP",
    "MetricInfo",
    "attention_distance",
    "delta_pct",
    "entropy",
    "erf",
    "gini",
    "head_diversity",
    "patch_distances",
    "query_attention_distance",
    "renormalize_patches",
    "summarize",
]  # fmt: skip

# The attention metrics and their display metadata are declared once, in `attndrift.signals`.
MetricInfo = Signal
METRICS: dict[str, Signal] = ATTENTION
delta_pct = drift_pct  # the one drift formula (NaN where undefined), under its old name


def _as_float(p: torch.Tensor) -> torch.Tensor:
    """float32 for the arithmetic (half-precision sums over hundreds of patches lose digits,
    ``log`` of small half values underflows); float64 stays float64."""
    return p if p.dtype == torch.float64 else p.to(torch.float32)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of ``p`` ``[..., N]`` (rows summing to 1) -> ``[...]``, float32
    (float64 for float64 input). Exact zeros contribute 0 (``torch.special.entr``): no epsilon
    inside the log. Differentiable."""
    return torch.special.entr(_as_float(p)).sum(dim=-1)


def erf(p: torch.Tensor, mass: float = 0.95) -> torch.Tensor:
    """Effective receptive field (000 eq. 2): fraction of patches holding ``mass`` of the
    attention.

    For each row, the smallest ``k`` such that the ``k`` largest weights sum to at least
    ``mass`` times the row's total, divided by ``N``. The sorted weights are accumulated in
    float64 and compared with ``mass * total`` exactly, with no tolerance: a row whose 12
    largest weights hold 0.94999958 needs a 13th. An all-zero row gives ``1/N``.

    ``p`` ``[..., N]`` non-negative weights (need not be normalised), ``mass`` in ``(0, 1]``
    -> ``[...]`` values in ``[1/N, 1]``, float32 (float64 for float64 input).
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    x = _as_float(p)
    return _erf_of_sorted(torch.sort(x, dim=-1).values, mass)


def gini(p: torch.Tensor) -> torch.Tensor:
    """Gini coefficient, ``G = 2 * sum_i(i * x_(i)) / (N * sum_i x_(i)) - (N + 1) / N`` with
    ``x`` sorted ascending, ``i = 1..N``: 0 for uniform weights, ``(N - 1) / N`` for a one-hot
    row, NaN for an all-zero row. ``p`` ``[..., N]`` non-negative weights -> ``[...]``, float32
    (float64 for float64 input)."""
    x = _as_float(p)
    return _gini_of_sorted(torch.sort(x, dim=-1).values)


def _erf_of_sorted(asc: torch.Tensor, mass: float) -> torch.Tensor:
    """``erf`` of rows already sorted ascending ``[..., N]``: the running sums of the
    descending weights, in float64 (on the CPU for a device without float64, e.g. MPS), ``c_k``
    for ``k = 1..N``; ``k* = 1 + #{k : c_k < mass * c_N}``, the first ``k`` reaching the
    target (``c_N`` reaches it for any ``mass <= 1``, and an all-zero row has ``k* = 1``)."""
    desc = asc.detach().flip(-1)
    desc = desc.cpu() if desc.device.type == "mps" else desc
    running = desc.to(torch.float64).cumsum(dim=-1)
    short = (running < mass * running[..., -1:]).sum(dim=-1)
    return ((short + 1).to(asc.dtype) / asc.shape[-1]).to(asc.device)


def _gini_of_sorted(asc: torch.Tensor) -> torch.Tensor:
    """``gini`` of rows already sorted ascending, via ``A_j = x_(1) + ... + x_(j)``, the running
    sums in the input's dtype: ``sum_j A_j`` counts ``x_(i)`` ``N - i + 1`` times, so
    ``sum_i i * x_(i) = (N + 1) * A_N - sum_j A_j`` (the numerator)."""
    run = asc.cumsum(dim=-1)
    return _gini_of_ratio(run.sum(dim=-1) / run[..., -1], asc.shape[-1])


def _gini_of_ratio(ratio: torch.Tensor, n: int) -> torch.Tensor:
    """``gini`` from ``ratio = sum_j A_j / A_N`` (see `_gini_of_sorted`)."""
    return (n + 1) / n - (2.0 / n) * ratio


def head_diversity(p: torch.Tensor) -> torch.Tensor:
    """1 - mean pairwise cosine similarity between heads' maps, over all pairs ``i < j``; 0 for
    a single head (no pairs). An all-zero map has cosine 0 with every other. ``p`` ``[..., H,
    N]`` one map per head -> ``[...]``, float32 (float64 for float64 input)."""
    x = _as_float(p)
    h = x.shape[-2]
    if h < 2:
        return torch.zeros(x.shape[:-2], dtype=x.dtype, device=x.device)
    # With unit maps u_i (zero maps stay zero, as in F.normalize), the sum over pairs i < j of
    # u_i . u_j is (|sum_i u_i|^2 - sum_i |u_i|^2) / 2: no Gram matrix.
    unit = x / x.square().sum(dim=-1, keepdim=True).sqrt().clamp(min=1e-12)
    pairs = unit.sum(dim=-2).square().sum(dim=-1) - unit.square().sum(dim=(-2, -1))
    return 1.0 - pairs / (h * (h - 1))


def patch_distances(n: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Euclidean distances between the centres of the ``n`` patches of a square grid, in patch
    widths (multiply by the patch size for pixels): ``[n, n]``. Patches in row-major order, the
    order a ViT's patch embedding flattens them. A grid that is not square is refused."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"mean attention distance needs a square grid of patches, got {n} "
                         "patches; pass maps of a square image")
    idx = torch.arange(n)
    pos = torch.stack([idx // side, idx % side], dim=-1).to(torch.float64)
    diff = pos[:, None, :] - pos[None, :, :]  # float64 on the host (MPS has none), then moved
    return diff.square().sum(dim=-1).sqrt().to(device=device, dtype=dtype)


def attention_distance(p: torch.Tensor) -> torch.Tensor:
    """Mean attention distance of the CLS query, in patch widths: ``sum_jk p_j p_k d(j, k) /
    (sum_j p_j)^2``, the expected distance between two patches drawn from the CLS attention.

    The papers' mean attention distance (Dosovitskiy et al. 2021, Raghu et al. 2021) is, per
    patch query ``i``, ``sum_j a_ij d(i, j)``; the CLS token has no position, so here the query
    is placed at a patch drawn from the CLS attention itself (docs/fidelity.md). 0 for attention
    on one patch; the mean distance between patches (self-pairs included) for uniform
    attention. ``p`` ``[..., N]`` non-negative weights on a square grid of ``N`` patches ->
    ``[...]``, float32 (float64 for float64 input). `query_attention_distance` is the papers'
    definition for patch queries.
    """
    x = _as_float(p)
    # the matmul in float64 (not on MPS, which has none): immune to TF32 matmul settings
    acc = x if x.device.type == "mps" else x.to(torch.float64)
    d = patch_distances(x.shape[-1], acc.dtype, acc.device)
    return (((acc @ d) * acc).sum(dim=-1) / acc.sum(dim=-1).square()).to(x.dtype)


def query_attention_distance(p: torch.Tensor) -> torch.Tensor:
    """The papers' mean attention distance of each patch query (Dosovitskiy et al. 2021 Fig. 7;
    Raghu et al. 2021): ``sum_j a_ij d(i, j) / sum_j a_ij``, in patch widths. ``p`` ``[..., N,
    N]``: row ``i`` = patch query ``i``'s weights over the ``N`` patch keys of a square grid
    (row-major) -> ``[..., N]``, float32 (float64 for float64 input)."""
    x = _as_float(p)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"p must be [..., N, N] patch-to-patch maps, got {tuple(x.shape)}")
    d = patch_distances(x.shape[-1], x.dtype, x.device)
    return (x * d).sum(dim=-1) / x.sum(dim=-1)


def renormalize_patches(cls_row: torch.Tensor) -> torch.Tensor:
    """Drop the CLS->CLS weight and renormalise the patch weights to sum to 1: ``[..., 1 + N]``
    (the CLS query's attention over all tokens, CLS first) -> ``[..., N]``, same dtype."""
    patches = cls_row[..., 1:]
    return patches / patches.sum(dim=-1, keepdim=True)


class _Sorted:
    """One ascending sort of each row, shared by ERF and Gini, made on first use."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self._asc = x, None

    @property
    def asc(self) -> torch.Tensor:
        if self._asc is None:
            self._asc = torch.sort(self.x, dim=-1).values
        return self._asc


# How each attention metric of `attndrift.signals.ATTENTION` is computed from a probe set's
# CLS->patch maps ``x`` ``[n_images, L, H, N]``. PER_MAP: a value per (image, layer, head)
# ``[n_images, L, H]``; PER_LAYER: a value per layer ``[L]`` (float64, on the CPU).
PER_MAP: dict[str, Callable[[torch.Tensor, _Sorted], torch.Tensor]] = {
    "entropy": lambda x, srt: entropy(x),
    "erf": lambda x, srt: _erf_of_sorted(srt.asc, 0.95),
    "gini": lambda x, srt: _gini_of_sorted(srt.asc),
    "attention_distance": lambda x, srt: attention_distance(x),
}
PER_LAYER: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # each head's map averaged over the images, then 1 - mean pairwise cosine between heads
    "head_diversity": lambda x: head_diversity(x.mean(dim=0).to("cpu", torch.float64)),
}


def summarize(cls_patch: torch.Tensor) -> dict[str, Any]:
    """Per-layer and per-head metric table for a whole probe set ``cls_patch`` ``[n_images, L,
    H, N]`` (CLS->patch attention, renormalised), as a plain-Python (JSON-able) dict, one entry
    per metric of `attndrift.signals.ATTENTION` in its order::

        {"entropy": {"layers": [L], "heads": [[H] x L]}, "erf": {...}, "gini": {...},
         "head_diversity": {"layers": [L]},
         "mean": {"entropy": float, "erf": float, "gini": float, "head_diversity": float}}

    Per-head value (``per_head`` metrics, `PER_MAP`): mean over images of the per-(image, head)
    metric. Per-layer value: mean over images and heads; for the others (`PER_LAYER`), e.g.
    head diversity: ``head_diversity`` of the ``[H, N]`` maps obtained by averaging each head's
    map over the images. ``mean``: mean over layers of the per-layer values.
    """
    if cls_patch.dim() != 4:
        raise ValueError(f"cls_patch must be [n_images, L, H, N], got {tuple(cls_patch.shape)}")
    if cls_patch.shape[0] == 0:
        raise ValueError("cls_patch has no images")
    missing = [m for m, s in ATTENTION.items() if m not in (PER_MAP if s.per_head else PER_LAYER)]
    if missing:
        raise KeyError(f"attention metrics {missing} are declared in attndrift.signals but have "
                       "no function in probes.metrics PER_MAP / PER_LAYER")
    x = _as_float(cls_patch.detach())
    srt = _Sorted(x)
    per_head = [m for m, s in ATTENTION.items() if s.per_head]
    per_image = torch.stack([PER_MAP[m](x, srt) for m in per_head])
    # float64 means on the host (a float32 mean of thousands of values ~3.6 is off by ~1e-6;
    # some devices, e.g. MPS, have no float64). Every (layer, head) has n images, so the
    # per-layer mean is the mean of the per-head means.
    heads = per_image.to("cpu", torch.float64).mean(dim=1)  # [k, L, H]
    layers = dict(zip(per_head, heads.mean(dim=-1), strict=True))  # [L] each
    tables = {m: {"heads": h} for m, h in zip(per_head, heads.tolist(), strict=True)}
    out: dict[str, Any] = {}
    for m in ATTENTION:
        value = layers[m] if m in layers else PER_LAYER[m](x)
        out[m] = {"layers": value.tolist(), **tables.get(m, {})}
        layers[m] = value
    out["mean"] = {m: layers[m].mean(dim=-1).item() for m in ATTENTION}
    return out
