"""Linear centered kernel alignment (CKA) between two models' layer representations.

The study compares each layer of a fine-tuned vision tower with the same layer of the
pretrained one on the probe images (its "mean CKA", Table 5). ``linear_cka`` is the pure metric
(Kornblith et al., 2019); ``layer_representations`` runs a tower once and keeps, per layer, the
CLS token and the mean patch token; ``layerwise_cka`` pairs two such sets up.

Numerics: everything is computed in float64 in feature space (``d x d`` products, never
``n x n`` Gram matrices), and each centred representation is divided by its Frobenius norm
before any product (CKA is invariant to isotropic scaling), so inputs of any magnitude, even
float32 values at 1e-20, give the same result as unit-scale ones. Centring first subtracts the
first row, which makes an exactly constant feature exactly zero instead of leaving round-off.
A representation with no variation at all (every row identical) has no similarity structure:
its CKA with anything is defined as 0 rather than NaN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attndrift.probes.capture import find_vision_tower

__all__ = ["layer_representations", "layerwise_cka", "linear_cka"]


def _centred_unit(x: torch.Tensor) -> torch.Tensor | None:
    """Column-centred ``x`` in float64 scaled to unit Frobenius norm; None if constant."""
    x = x.detach().to(torch.float64)
    x = x - x[:1]  # exact zeros for constant columns: the mean then leaves no round-off
    x = x - x.mean(dim=0, keepdim=True)
    peak = x.abs().max()
    if not torch.isfinite(peak):
        raise ValueError("representation contains NaN or inf")
    if peak == 0:
        return None
    x = x / peak  # first to O(1), so the squares in the norm cannot under- or overflow
    return x / torch.linalg.matrix_norm(x)


def _hsic_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of linear kernels ``K = x x^T``, ``L = y y^T`` (Song et al., 2012), in
    feature space: O(n d1 d2), no ``n x n`` matrix.

    ``HSIC_u = [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))`` with
    ``K~``, ``L~`` the Gram matrices with their diagonals set to zero.
    """
    n = x.shape[0]
    dk = (x * x).sum(dim=1)  # diag(K)
    dl = (y * y).sum(dim=1)
    tr = torch.linalg.matrix_norm(x.T @ y) ** 2 - (dk * dl).sum()  # tr(K~ L~)
    k1 = x @ x.sum(dim=0) - dk  # K~ 1
    l1 = y @ y.sum(dim=0) - dl
    sum_k, sum_l = k1.sum(), l1.sum()
    return (tr + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)) / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> torch.Tensor:
    """Linear CKA of two representations of the same ``n`` inputs.

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with linear kernels on column-centred
    features; the biased form reduces to ``||y'x||_F^2 / (||x'x||_F ||y'y||_F)``. ``debiased``
    uses the unbiased HSIC estimator (Song et al., 2012; as in Nguyen et al., 2021), which
    removes the upward bias of CKA at small ``n`` relative to the feature dimension; it needs
    ``n >= 4``, and can come out slightly negative (or, for near-degenerate data, have a
    non-positive self-similarity, reported as 0).

    Args:
        x: ``[n, d1]`` features, one row per input.
        y: ``[n, d2]`` features of the same inputs, same order.
        debiased: use the unbiased HSIC estimator.

    Returns:
        A float64 scalar tensor: 1 for identical representations (up to rotation, isotropic
        scaling and translation), 0 if either representation is constant.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be [n, d] with the same n, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    n = x.shape[0]
    if n < (4 if debiased else 2):
        raise ValueError(f"{'debiased ' if debiased else ''}CKA needs at least "
                         f"{4 if debiased else 2} inputs, got {n}")
    xc, yc = _centred_unit(x), _centred_unit(y)
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    if xc is None or yc is None:
        return zero
    if debiased:
        hxy, hxx, hyy = _hsic_unbiased(xc, yc), _hsic_unbiased(xc, xc), _hsic_unbiased(yc, yc)
        if hxx <= 0 or hyy <= 0:
            return zero
        return hxy / torch.sqrt(hxx * hyy)
    cross = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    return cross / (torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc))


@torch.no_grad()
def layer_representations(vision_model: nn.Module, pixel_values: torch.Tensor,
                          batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """Per-layer CLS token and mean patch token of the vision tower inside ``vision_model``.

    Runs the tower (``find_vision_tower``: the CLIP/ViT vision tower of a CLIPModel, a
    classifier, a PeftModel...) with ``output_hidden_states=True`` under ``no_grad`` in eval
    mode (the previous train/eval state of every module is restored) and keeps
    ``hidden_states[1:]``, the residual stream after each encoder layer.

    Returns:
        ``{"cls": [L, B, D], "patch_mean": [L, B, D]}`` float32 on CPU.
    """
    tower = find_vision_tower(vision_model)
    flags = [(m, m.training) for m in tower.modules()]
    tower.eval()
    try:
        cls_parts, patch_parts = [], []
        step = batch_size or max(1, pixel_values.shape[0])
        for start in range(0, pixel_values.shape[0], step):
            out = tower(pixel_values=pixel_values[start : start + step],
                        output_hidden_states=True)
            hidden = torch.stack(out.hidden_states[1:]).float()  # [L, b, T, D]
            cls_parts.append(hidden[:, :, 0].cpu())
            patch_parts.append(hidden[:, :, 1:].mean(dim=2).cpu())
    finally:
        for module, training in flags:
            module.training = training
    return {"cls": torch.cat(cls_parts, dim=1), "patch_mean": torch.cat(patch_parts, dim=1)}


def layerwise_cka(reps_a: dict[str, torch.Tensor], reps_b: dict[str, torch.Tensor],
                  debiased: bool = False) -> dict[str, Any]:
    """Linear CKA of each layer of ``reps_a`` with the same layer of ``reps_b``.

    Args:
        reps_a, reps_b: ``layer_representations`` outputs of two models on the same images.

    Returns:
        ``{"cls": [L floats], "patch_mean": [L floats]}``.
    """
    out: dict[str, Any] = {}
    for key in ("cls", "patch_mean"):
        a, b = reps_a[key], reps_b[key]
        if a.shape[:2] != b.shape[:2]:
            raise ValueError(f"{key}: representations of different layers/images, "
                             f"{tuple(a.shape)} vs {tuple(b.shape)}")
        out[key] = [linear_cka(a[layer], b[layer], debiased).item() for layer in range(len(a))]
    return out
