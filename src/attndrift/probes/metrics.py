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
sorted, and sorting dominates the cost, so both come from one pass over the sorted rows
(``_sorted_stats``). On the CPU, for float32 outside autograd, the optional compiled kernel
``_rowstats`` (built by setup.py) sorts sixteen rows at a time with a vectorised sorting network
and derives both statistics without writing the sorted rows; the rows are split over
``torch.get_num_threads()`` threads. Without it, numpy sorts the rows (its vectorised sort of
short rows is several times faster than ``torch.sort``), and torch takes the running sums: the
same values (ERF exactly; Gini to float32 rounding). ``summarize`` also reuses one per-thread
scratch buffer for its temporaries and accumulates its means in float64.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch

try:  # the optional compiled kernel (setup.py); without it numpy and torch compute the same
    from attndrift.probes import _rowstats
except ImportError:  # pragma: no cover - depends on the build
    _rowstats = None

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
    x = _as_float(p)
    fit, _ = _sorted_stats(x, mass)
    return _erf_of_fit(fit.to(x.dtype), x.shape[-1])


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
    x = _as_float(p)
    _, ratio = _sorted_stats(x, 0.95)
    return _gini_of_ratio(ratio, x.shape[-1]).to(x.dtype)


def _check_mass(mass: float) -> None:
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")


def _sorted_stats(x: torch.Tensor, mass: float, scratch: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """What ERF and Gini need from each row of ``x`` ``[..., N]`` sorted ascending, with
    ``A_j = x_(1) + ... + x_(j)`` its running sums (``A_N`` the row's total):

    - ``fit`` ``[...]``: how many of the smallest weights fit in the spare mass, the number of
      ``j`` with ``A_j <= A_N * (1 - mass * (1 - ERF_RTOL))``. The ``k`` largest weights hold
      ``A_N - A_(N-k)``, so they reach the ERF target exactly when ``N - k`` of the smallest fit.
    - ``ratio`` ``[...]``: ``sum_j A_j / A_N``. ``sum_j A_j`` counts ``x_(i)`` ``N - i + 1``
      times, so ``sum_i i * x_(i) = (N + 1) * A_N - sum_j A_j`` (the Gini numerator).

    The compiled kernel (``_kernel_applies``) returns ``ratio`` in float64; the torch path in
    ``x``'s dtype, from ``_ascending_cumsum`` (which may use ``scratch``). Both take the running
    sums as ``torch.cumsum`` does on the CPU (double accumulator, one float32 rounding per sum),
    so ``fit`` is the same either way.
    """
    if _kernel_applies(x):
        fit, ratio, _ = _kernel_stats(x, mass)
        return fit, ratio
    asc = _ascending_cumsum(x, scratch)
    spare = asc[..., -1:] * _keep(mass)
    fit = torch.searchsorted(asc.contiguous(), spare.contiguous(), right=True).squeeze(-1)
    return fit, asc.sum(dim=-1) / asc[..., -1]


def _kernel_applies(x: torch.Tensor) -> bool:
    """The compiled kernel is built and takes ``x``: float32 on the CPU, no autograd."""
    return (_rowstats is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() > 0 and x.numel() > 0
            and not (x.requires_grad and torch.is_grad_enabled()))


def _keep(mass: float) -> float:
    """The spare fraction of a row's total that the smallest weights may fill for ERF."""
    return 1.0 - mass * (1.0 - ERF_RTOL)


def _kernel_stats(x: torch.Tensor, mass: float, with_entropy: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``fit`` (int32), ``ratio`` (float64) and, if asked, the entropy (float64, clamped like
    ``entropy``) of every row of ``x``, by the compiled kernel, rows split over the sorting
    threads. Shapes ``x.shape[:-1]``."""
    n = x.shape[-1]
    bits = x.detach().reshape(-1, n).contiguous().view(torch.int32).numpy()
    fit = np.empty(bits.shape[0], dtype=np.int32)
    ratio = np.empty(bits.shape[0], dtype=np.float64)
    ent = np.empty(bits.shape[0], dtype=np.float64) if with_entropy else None
    first, second = _sorting_network(n)
    coef = _log1p_coefficients() if with_entropy else None

    def rows(lo: int, hi: int) -> None:
        _rowstats.row_stats(bits[lo:hi], n, first, second, _keep(mass), fit[lo:hi], ratio[lo:hi],
                            None if ent is None else ent[lo:hi], coef)

    _split_rows(bits.shape[0], x.numel(), rows)
    shape = x.shape[:-1]
    return (torch.from_numpy(fit).view(shape), torch.from_numpy(ratio).view(shape),
            None if ent is None else torch.from_numpy(ent).view(shape))


@functools.cache
def _log1p_coefficients() -> np.ndarray:
    """Power-series coefficients ``c_0..c_12`` of ``log1p(f) / f`` for the kernel's logarithm,
    ``f`` in ``[sqrt(1/2) - 1, sqrt(2) - 1]``: Chebyshev interpolation of degree 12, within
    1e-11 of ``log1p`` there (tests/test_metrics.py checks the kernel's entropy in float64)."""
    from numpy.polynomial import Chebyshev, Polynomial

    def log1p_over_f(f: np.ndarray) -> np.ndarray:
        safe = np.where(f == 0.0, 1.0, f)
        return np.where(f == 0.0, 1.0, np.log1p(safe) / safe)

    fitted = Chebyshev.interpolate(log1p_over_f, 12, domain=[math.sqrt(0.5) - 1, math.sqrt(2) - 1])
    coef = np.ascontiguousarray(fitted.convert(kind=Polynomial).coef, dtype=np.float64)
    coef.flags.writeable = False
    return coef


@functools.cache
def _sorting_network(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Comparators ``(first[c], second[c])``, ``first < second``, of Batcher's odd-even merge
    sort for ``n`` inputs: applied in order, each putting the smaller of its two positions'
    values first, they sort any row.

    The network is the one for the next power of two less every comparator that touches a
    position ``>= n``: those positions act as +inf padding, which no comparator ever moves.
    """
    size = 1 << max(0, n - 1).bit_length()
    pairs = []
    run = 1
    while run < size:  # merge sorted runs of length ``run`` into runs of ``2 * run``
        step = run
        while step >= 1:
            for base in range(step % run, size - step, 2 * step):
                for i in range(base, base + min(step, size - base - step)):
                    if i // (2 * run) == (i + step) // (2 * run) and i + step < n:
                        pairs.append((i, i + step))
            step //= 2
        run *= 2
    first = np.array([a for a, _ in pairs], dtype=np.int32)
    second = np.array([b for _, b in pairs], dtype=np.int32)
    first.flags.writeable = second.flags.writeable = False
    return first, second


def _split_rows(rows: int, numel: int, work) -> None:
    """Run ``work(lo, hi)`` over consecutive row ranges covering ``0..rows``: one range per
    ``torch.get_num_threads()`` thread, each of at least ``_SPLIT_MIN`` elements (the calling
    thread takes the first; numpy and the kernel release the GIL while they work)."""
    threads = max(1, min(torch.get_num_threads(), numel // _SPLIT_MIN))
    bounds = [rows * i // threads for i in range(threads + 1)]
    jobs = [_sort_pool(threads - 1).submit(work, lo, hi)
            for lo, hi in itertools.pairwise(bounds[1:])] if threads > 1 else []
    work(0, bounds[1])
    for job in jobs:
        job.result()


def _ascending_cumsum(x: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Running sums of each row sorted ascending, ``A_j = x_(1) + ... + x_(j)`` (smallest
    first), ``[..., N]``; ``A_N`` is the row's total.

    On the CPU, outside autograd, numpy sorts (see the module docstring) into ``scratch`` (or a
    fresh buffer), and the running sums overwrite the sorted values in place. Large inputs are
    split into row ranges over the sorting threads (``_split_rows``). Elsewhere (CUDA,
    gradients) torch sorts.
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

    _split_rows(src.shape[0], x.numel(), sort_rows)
    return scratch.view(x.shape).cumsum_(dim=-1)


def _sort_pool(workers: int) -> ThreadPoolExecutor:
    """The helper sorting threads, created on first use; a forked child (whose copy of the
    pool has no threads) makes its own."""
    global _pool, _pool_key
    if _pool is None or _pool_key[0] != os.getpid() or _pool_key[1] < workers:
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="attndrift-sort")
        _pool_key = (os.getpid(), workers)
    return _pool


def _erf_of_fit(fit: torch.Tensor, n: int) -> torch.Tensor:
    """``erf`` from ``_sorted_stats``' ``fit`` (at least one patch, for an all-zero row)."""
    return (n - fit).clip(min=1) / n  # a tensor or an array


def _gini_of_ratio(ratio: torch.Tensor, n: int) -> torch.Tensor:
    """``gini`` from ``_sorted_stats``' ``ratio`` (see there for the identity)."""
    return (n + 1) / n - (2.0 / n) * ratio


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
    # With unit maps u_i (zero maps stay zero, as in F.normalize), the sum over pairs i < j of
    # u_i . u_j is (|sum_i u_i|^2 - sum_i |u_i|^2) / 2: no Gram matrix. (Elementwise ops only,
    # too: a batched matmul or F.normalize here wakes torch's OpenMP threads, which then spin
    # for ~20 ms on the cores that summarize's sorting threads need next.)
    unit = x / x.square().sum(dim=-1, keepdim=True).sqrt().clamp(min=1e-12)
    pairs = unit.sum(dim=-2).square().sum(dim=-1) - unit.square().sum(dim=(-2, -1))
    return 1.0 - pairs / (h * (h - 1))


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
    n_patches = x.shape[-1]
    names = ("entropy", "erf", "gini")
    # float64 means: a float32 mean of thousands of values ~3.6 is off by ~1e-6. Every
    # (layer, head) has n images, so the per-layer mean is the mean of the per-head means.
    # The small per-image tables go to the host for that (some devices, e.g. MPS, have no
    # float64; the table ends up on the host anyway).
    if _kernel_applies(x):
        # One kernel pass gives all three per-row values, and the image-mean maps come from
        # numpy: no parallel torch op, whose idle OpenMP threads would spin on the cores the
        # kernel's threads need (for ~20 ms after every such op).
        x = x.contiguous()  # once, for the kernel and the maps
        fit, ratio, ent = _kernel_stats(x, 0.95, with_entropy=True)
        maps = torch.from_numpy(x.view(x.shape[0], -1).numpy().mean(axis=0))
    else:
        scratch = _scratch(x)
        ent = _entropy_into(x, scratch)  # [n, L, H]; then scratch is free
        fit, ratio = _sorted_stats(x, 0.95, scratch)  # one sort serves ERF and Gini
        maps = x.mean(dim=0)
    per_image_head = np.stack([t.to("cpu", torch.float64).numpy() for t in (ent, fit, ratio)])
    per_image_head[1] = _erf_of_fit(per_image_head[1], n_patches)
    per_image_head[2] = _gini_of_ratio(per_image_head[2], n_patches)  # [3, n, L, H]
    per_head = per_image_head.mean(axis=1)  # [3, L, H]
    per_layer = per_head.mean(axis=-1)  # [3, L]
    diversity = head_diversity(maps.view(x.shape[1:]).to("cpu", torch.float64))  # [L]
    out: dict[str, Any] = {
        name: {"layers": layers, "heads": heads}
        for name, layers, heads in zip(names, per_layer.tolist(), per_head.tolist(), strict=True)
    }
    out["head_diversity"] = {"layers": diversity.tolist()}
    out["mean"] = dict(zip((*names, "head_diversity"),
                           [*per_layer.mean(axis=-1).tolist(), diversity.mean().item()],
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
