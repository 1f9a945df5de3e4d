"""Attention rollout and patch-to-patch entropy: pure functions of full attention maps.

Both take the full maps ``[B, L, H, T, T]`` (row = query, token 0 = CLS) that
`attndrift.probes.capture.full_attention` returns, and serve the study's auxiliary validation
(its Table 5): do the conclusions drawn from CLS->patch entropy hold for multi-layer routing
(rollout) and for the patches' own attention (patch-to-patch)?

Attention rollout (Abnar & Zuidema, 2020): per layer, average the heads and mix in the residual
stream as an identity, ``A'_l = residual * I + (1 - residual) * mean_h(A_l)`` (rows
renormalised), then compose over depth, ``R = A'_L @ ... @ A'_1``. Row ``i`` of ``R`` says how
much of token ``i``'s final representation routes back to each input token.

Everything is float32 (float64 input stays float64) and vectorised over images.
"""

from __future__ import annotations

from typing import Any

import torch

from attndrift.probes.metrics import entropy, erf, gini, query_attention_distance

__all__ = [
    "attention_rollout",
    "patch_to_patch_distance",
    "patch_to_patch_entropy",
    "rollout_cls_patch",
    "rollout_summary",
]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def _check_full(attn: torch.Tensor) -> None:
    if attn.dim() != 5 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be [B, L, H, T, T], got shape {tuple(attn.shape)}")


def _renormalize_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(dim=-1, keepdim=True)


def attention_rollout(attn: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Rollout ``R = A'_L @ ... @ A'_1`` with ``A'_l = residual*I + (1-residual)*mean_h(A_l)``.

    Args:
        attn: ``[B, L, H, T, T]`` attention maps, rows summing to 1, layers in forward order.
        residual: weight of the identity (the skip connection), in ``[0, 1]``.

    Returns:
        ``[B, T, T]`` row-stochastic rollout, float32 (float64 if ``attn`` is float64).
    """
    _check_full(attn)
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1], got {residual}")
    a = _as_float(attn.detach()).mean(dim=2)  # [B, L, T, T]: heads averaged
    t = a.shape[-1]
    eye = torch.eye(t, dtype=a.dtype, device=a.device)
    a = _renormalize_rows(residual * eye + (1.0 - residual) * a)
    rollout = a[:, 0]
    for layer in range(1, a.shape[1]):
        rollout = a[:, layer] @ rollout  # later layers act on the left
    return rollout


def rollout_cls_patch(rollout: torch.Tensor) -> torch.Tensor:
    """CLS row of a rollout, CLS dropped and the patches renormalised: ``[B, T, T] -> [B, N]``."""
    if rollout.dim() != 3:
        raise ValueError(f"rollout must be [B, T, T], got shape {tuple(rollout.shape)}")
    return _renormalize_rows(rollout[:, 0, 1:])


def patch_to_patch_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the patch-to-patch attention rows, per layer.

    For every patch query, its weights over the patch keys (the CLS key dropped, the row
    renormalised) form a distribution; its entropy is averaged over query rows, heads and
    images. Uniform attention gives ``ln N``.

    Args:
        attn: ``[B, L, H, T, T]`` attention maps.

    Returns:
        ``[L]`` float32 (float64 if ``attn`` is float64).
    """
    _check_full(attn)
    p2p = _renormalize_rows(_as_float(attn.detach())[..., 1:, 1:])  # [B, L, H, N, N]
    return entropy(p2p).mean(dim=(0, 2, 3))


def patch_to_patch_distance(attn: torch.Tensor) -> torch.Tensor:
    """Mean attention distance of the patch queries, per layer, in patch widths (Dosovitskiy et
    al. 2021; Raghu et al. 2021): each patch query's weights over the patch keys (CLS key
    dropped, row renormalised, as `patch_to_patch_entropy`), ``sum_j a_ij d(i, j)``, averaged
    over queries, heads and images. ``attn`` ``[B, L, H, T, T]`` on a square patch grid ->
    ``[L]``, float32 (float64 if ``attn`` is float64)."""
    _check_full(attn)
    p2p = _renormalize_rows(_as_float(attn.detach())[..., 1:, 1:])  # [B, L, H, N, N]
    return query_attention_distance(p2p).mean(dim=(0, 2, 3))


def rollout_summary(attn: torch.Tensor, residual: float = 0.5) -> dict[str, Any]:
    """The auxiliary table of a probe set (plain Python, JSON-able).

    Args:
        attn: ``[n_images, L, H, T, T]`` full attention maps of the whole probe set.
        residual: identity weight of the rollout.

    Returns:
        ``{"rollout_entropy", "rollout_erf", "rollout_gini"}``: entropy (nats), ERF@0.95 and
        Gini of each image's rollout CLS->patch distribution, averaged over images;
        ``"p2p_entropy"``: patch-to-patch entropy averaged over layers, and
        ``"p2p_entropy_layers"``: the ``L`` per-layer values; ``"p2p_distance"`` and
        ``"p2p_distance_layers"`` likewise for `patch_to_patch_distance`. Every value is a mean
        over images, so batches of a probe set combine by an image-weighted mean.
    """
    cls_patch = rollout_cls_patch(attention_rollout(attn, residual))  # [n, N]
    p2p = patch_to_patch_entropy(attn)
    distance = patch_to_patch_distance(attn)
    return {
        "rollout_entropy": entropy(cls_patch).mean().item(),
        "rollout_erf": erf(cls_patch).mean().item(),
        "rollout_gini": gini(cls_patch).mean().item(),
        "p2p_entropy": p2p.mean().item(),
        "p2p_entropy_layers": p2p.tolist(),
        "p2p_distance": distance.mean().item(),
        "p2p_distance_layers": distance.tolist(),
    }
