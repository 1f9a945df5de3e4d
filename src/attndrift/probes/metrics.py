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

Speed (measured by benchmarks/run.py, see docs/performance.md): ERF and Gini need every row
sorted, and sorting dominates the cost, so ``summarize`` sorts once for both and derives both
from the same ascending running sums. On the CPU, outside autograd, numpy sorts the rows: its
vectorised sort of short rows is several times faster than ``torch.sort`` (which also builds an
index tensor), and sorting is exact, so the values are the same. ``summarize`` also reuses one
per-thread scratch buffer for its temporaries and accumulates its means in float64.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
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

# Below _NUMPY_SORT_MIN elements torch.sort is as fast as numpy. Large inputs are sorted on up
# to torch.get_num_threads() threads, each taking at least _SPLIT_MIN elements, in blocks of
# _SORT_BLOCK rows (cache-sized). summarize keeps its scratch buffer between calls up to
# _SCRATCH_MAX elements.
_NUMPY_SORT_MIN = 4096
_SPLIT_MIN = 1 << 17
_SORT_BLOCK = 1024
_SCRATCH_MAX = 1 << 25
_pool: ThreadPoolExecutor | None = None  # created on first use, never at import
_pool_key = (0, 0)  # (process id, threads) of _pool
_local = threading.local()


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
        (as in ``torch.special.entr``, which computes it under autograd), so no epsilon is
        added inside the log.
    """
    x = _as_float(p)
    if x.requires_grad and torch.is_grad_enabled():
        return torch.special.entr(x).sum(dim=-1)
    return _entropy_into(x, torch.empty_like(x, memory_format=torch.contiguous_format))


def _entropy_into(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``entropy`` of ``x`` (no autograd) with ``scratch`` (``x``'s shape) as its temporary.

    Same values as ``torch.special.entr`` in about half the time: zeros are clamped to the
    smallest normal number, and ``0 * log(tiny) = 0``.
    """
    torch.clamp_min(x, torch.finfo(x.dtype).tiny, out=scratch)
    scratch.log_().mul_(x)
    return scratch.sum(dim=-1).neg_()


def _scratch(x: torch.Tensor) -> torch.Tensor:
    """A temporary shaped like ``x``. On the CPU it is a per-thread buffer kept between calls:
    a fresh ~6 MB buffer per 200-image probe costs more in page faults than the arithmetic
    done in it. Elsewhere, or above ``_SCRATCH_MAX`` elements, a new tensor."""
    if x.device.type != "cpu" or x.numel() > _SCRATCH_MAX:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    nbytes = x.numel() * x.element_size()
    buffer = getattr(_local, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        buffer = _local.buffer = torch.empty(nbytes, dtype=torch.uint8)
    return buffer[:nbytes].view(x.dtype).view(x.shape)


def erf(p: torch.Tensor, mass: float = 0.95) -> torch.Tensor:
    """Effective receptive field: fraction of patches holding ``mass`` of the attention.

    For each row, the smallest ``k`` such that the ``k`` largest weights sum to at least
    ``mass`` times the row's total, divided by ``N``. The comparison accepts sums within a
    relative ``ERF_RTOL`` (1e-6) below the target, so round-off at an exact boundary does not
    cost an extra patch. An all-zero row gives ``1/N``.

    Args:
        p: ``[..., N]`` non-negative weights (need not be normalised).
        mass: target fraction of the total, in ``(0, 1]``.

    Returns:
        ``[...]`` values in ``[1/N, 1]``, float32 (float64 if ``p`` is float64).
    """
    _check_mass(mass)
    return _erf_of_cumsum(_ascending_cumsum(_as_float(p)), mass)


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
    return _gini_of_cumsum(_ascending_cumsum(_as_float(p)))


def _check_mass(mass: float) -> None:
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")


def _ascending_cumsum(x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Running sums of each row sorted ascending, ``A_j = x_(1) + ... + x_(j)`` (smallest
    first), ``[..., N]``; ``A_N`` is the row's total.

    On the CPU, outside autograd, numpy sorts (see the module docstring) into ``scratch`` (or a
    fresh buffer), and the running sums overwrite the sorted values in place. Large inputs are
    split into row ranges, one per ``torch.get_num_threads()`` thread (numpy releases the GIL
    while it sorts). Elsewhere (CUDA, gradients) torch sorts.
    """
    if (x.device.type != "cpu" or x.dim() == 0 or x.numel() < _NUMPY_SORT_MIN
            or x.dtype not in (torch.float32, torch.float64)
            or (x.requires_grad and torch.is_grad_enabled())):
        return torch.sort(x, dim=-1).values.cumsum(dim=-1)
    # Non-negative floats order like their bit patterns read as integers, and integers sort
    # faster (no NaN handling). (-0.0 reads as the smallest integer and sorts as the smallest
    # weight; NaN sorts last, as in torch.)
    ints = torch.int32 if x.dtype == torch.float32 else torch.int64
    n = x.shape[-1]
    src = x.detach().reshape(-1, n).view(ints).numpy()  # no copy if x is contiguous
    if scratch is None:
        scratch = torch.empty_like(x, memory_format=torch.contiguous_format)
    out = scratch.view(-1, n).view(ints).numpy()

    def sort_rows(lo: int, hi: int) -> None:
        for start in range(lo, hi, _SORT_BLOCK):  # copy and sort while the block is in cache
            block = out[start:min(start + _SORT_BLOCK, hi)]
            block[...] = src[start:start + len(block)]
            block.sort(axis=-1)

    rows = src.shape[0]
    threads = max(1, min(torch.get_num_threads(), x.numel() // _SPLIT_MIN))
    bounds = [rows * i // threads for i in range(threads + 1)]
    jobs = [_sort_pool(threads - 1).submit(sort_rows, lo, hi)
            for lo, hi in itertools.pairwise(bounds[1:])] if threads > 1 else []
    sort_rows(0, bounds[1])  # this thread takes the first block
    for job in jobs:
        job.result()
    return scratch.view(x.shape).cumsum_(dim=-1)


def _sort_pool(workers: int) -> ThreadPoolExecutor:
    """The helper sorting threads, created on first use; a forked child (whose copy of the
    pool has no threads) makes its own."""
    global _pool, _pool_key
    if _pool is None or _pool_key[0] != os.getpid() or _pool_key[1] < workers:
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="attndrift-sort")
        _pool_key = (os.getpid(), workers)
    return _pool


def _erf_of_cumsum(asc: torch.Tensor, mass: float) -> torch.Tensor:
    """``erf`` from the ascending running sums of each row.

    The ``k`` largest weights hold ``A_N - A_(N-k)``, so they reach the target exactly when the
    ``N - k`` smallest hold at most ``A_N * (1 - mass * (1 - ERF_RTOL))``; the running sums of
    non-negative weights never decrease, so a binary search counts the smallest that fit.
    """
    n = asc.shape[-1]
    spare = asc[..., -1:] * (1.0 - mass * (1.0 - ERF_RTOL))
    fit = torch.searchsorted(asc.contiguous(), spare.contiguous(), right=True).squeeze(-1)
    return (n - fit).clamp(min=1).to(asc.dtype) / n


def _gini_of_cumsum(asc: torch.Tensor) -> torch.Tensor:
    """``gini`` from the ascending running sums of each row: ``sum_j A_j`` counts ``x_(i)``
    ``N - i + 1`` times, so ``sum_i i * x_(i) = (N + 1) * A_N - sum_j A_j``."""
    n = asc.shape[-1]
    return (n + 1) / n - 2.0 * asc.sum(dim=-1) / (n * asc[..., -1])


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
    scratch = _scratch(x)
    per_image_head_entropy = _entropy_into(x, scratch)  # [n, L, H]; then scratch is free
    cum = _ascending_cumsum(x, scratch)  # one sort serves ERF and Gini
    names = ("entropy", "erf", "gini")
    # float64 means: a float32 mean of thousands of values ~3.6 is off by ~1e-6. Every
    # (layer, head) has n images, so the per-layer mean is the mean of the per-head means.
    # The small per-image tables go to the host for that (some devices, e.g. MPS, have no
    # float64; the table ends up on the host anyway).
    per_image_head = torch.stack((per_image_head_entropy, _erf_of_cumsum(cum, 0.95),
                                  _gini_of_cumsum(cum))).to("cpu", torch.float64)  # [3, n, L, H]
    per_head = per_image_head.mean(dim=1)  # [3, L, H]
    per_layer = per_head.mean(dim=-1)  # [3, L]
    diversity = head_diversity(x.mean(dim=0).to("cpu", torch.float64))  # [L]
    out: dict[str, Any] = {
        name: {"layers": layers, "heads": heads}
        for name, layers, heads in zip(names, per_layer.tolist(), per_head.tolist(), strict=True)
    }
    out["head_diversity"] = {"layers": diversity.tolist()}
    out["mean"] = dict(zip((*names, "head_diversity"),
                           torch.cat((per_layer.mean(dim=-1), diversity.mean().view(1))).tolist(),
                           strict=True))
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
