"""Regularizers against attention drift: pure loss functions, one registry entry each.

- ``apr`` (attention preservation, the study's R1): KL(current || pretrained) of the CLS->patch
  maps, so attention may sharpen or spread only where the task pays for it.
- ``entropy_floor`` (the study's R2): a hinge per (image, head) map, penalising every CLS->patch
  map whose entropy falls below its layer's floor ``tau_l`` (by default 0.7 x the pretrained
  layer entropy), averaged over images and heads and summed over layers.
- ``l2sp`` (Li et al., 2018): squared distance of the weights from the pretrained starting
  point, the weight-space counterpart.

Each is one `Regularizer` in `REGULARIZERS` (its label, the config keys it reads and its figure
style are its `attndrift.methods.RegularizerSpec`): the training loop calls ``prepare`` before
any update (references from the pretrained model), ``start`` once the pretrained baseline is
measured, and ``penalty`` on every step, and adds ``lambda * penalty``. For the attention
regularizers (``RegularizerSpec.attention``) the loop captures ``current`` on the training
batch with ``AttentionProbe(model, detach=False)`` (so the loss reaches q_proj/k_proj) and
renormalises it over the patches. Every loss is computed in float32 whatever the
input dtype or autocast state (bf16 attention would lose the small probabilities that entropy
and KL are made of), and no epsilon is added inside a log: ``p log p`` terms use ``xlogy``
(exactly 0 at p = 0) with the log's argument clamped at ``torch.finfo(float32).tiny``, which
keeps both the value and the gradient finite at exact zeros.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from attndrift.methods import REGULARIZERS as SPECS

__all__ = [
    "REGULARIZERS",
    "Batch",
    "Pretrained",
    "Regularizer",
    "apr_loss",
    "entropy_floor_loss",
    "entropy_floor_targets",
    "l2sp_loss",
    "layer_entropy",
    "map_entropy",
    "register_regularizer",
]

TINY = torch.finfo(torch.float32).tiny

@dataclass
class Pretrained:
    """What a regularizer may take from the run before any update (`Regularizer.prepare`)."""

    model: nn.Module  # the adapted model, still pretrained
    layers: list[int] | None  # regularizer.layers
    ratio: float  # regularizer.ratio
    device: torch.device
    attention_cache: Callable[[], torch.Tensor]  # pretrained maps of every training image


@dataclass
class Batch:
    """One training step, as a regularizer's ``penalty`` sees it."""

    model: nn.Module
    maps: torch.Tensor | None  # [B, L, H, N] renormalised maps with a graph (attention ones)
    index: torch.Tensor  # the images' indices in the training split
    flips: torch.Tensor | None  # which images were flipped (None: no flip drawn)


@dataclass(frozen=True)
class Regularizer:
    """How the loop applies one regularizer: ``prepare(Pretrained) -> state`` before any
    update, ``start(state, pretrained layer entropies) -> state`` once the baseline is known,
    ``penalty(state, Batch) -> float32 scalar`` on each step."""

    name: str
    loss: Callable[..., torch.Tensor]
    prepare: Callable[[Pretrained], dict[str, Any]]
    penalty: Callable[[dict[str, Any], Batch], torch.Tensor]
    start: Callable[[dict[str, Any], Sequence[float]], dict[str, Any]] = field(
        default=lambda state, layer_entropy: state)

    @property
    def attention(self) -> bool:
        return SPECS[self.name].attention


REGULARIZERS: dict[str, Regularizer] = {}


def register_regularizer(name: str, **hooks: Any) -> Callable[[Callable[..., Any]],
                                                            Callable[..., Any]]:
    """Register the loss ``name`` with its loop ``hooks`` (`Regularizer`); its
    `RegularizerSpec` must exist."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in REGULARIZERS or name not in SPECS:
            raise ValueError(f"regularizer {name!r}: registered twice, or no RegularizerSpec "
                             "in attndrift.methods")
        REGULARIZERS[name] = Regularizer(name, fn, **hooks)
        return fn

    return wrap


def regularizer(name: str) -> Regularizer | None:
    """The registered regularizer ``name``; None for ``none``."""
    if name == "none":
        return None
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose none or one of "
                         f"{', '.join(REGULARIZERS)}")
    return REGULARIZERS[name]


def _no_autocast(t: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    if torch.amp.is_autocast_available(t.device.type):
        return torch.autocast(device_type=t.device.type, enabled=False)
    return contextlib.nullcontext()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _check_maps(name: str, t: torch.Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"{name} must be CLS->patch maps [B, L, H, N], got shape "
                         f"{tuple(t.shape)}")


def _plogp(p: torch.Tensor) -> torch.Tensor:
    """``p * log p`` with 0 at p = 0 and a finite gradient there."""
    return torch.xlogy(p, p.clamp_min(TINY))


def _apr_penalty(state: dict[str, Any], b: Batch) -> torch.Tensor:
    ref = state["ref"][b.index, b.flips.long() if b.flips is not None else 0]
    return apr_loss(b.maps, ref.to(b.maps.device, torch.float32, non_blocking=True))


@register_regularizer("apr", prepare=lambda pre: {"ref": pre.attention_cache()},
                      penalty=_apr_penalty)
def apr_loss(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Attention preservation: ``KL(current || reference)``, summed over patches, averaged over
    images, layers and heads.

    Args:
        current: ``[B, L, H, N]`` CLS->patch maps of the model being trained (with a graph).
        reference: ``[B, L, H, N]`` the pretrained model's maps of the same images; treated as
            a constant (detached), clamped at the float32 ``tiny`` inside the log.

    Returns:
        float32 scalar, 0 when ``current == reference``.
    """
    _check_maps("current", current)
    if reference.shape != current.shape:
        raise ValueError(f"reference {tuple(reference.shape)} != current {tuple(current.shape)}")
    with _no_autocast(current):
        p, q = _f32(current), _f32(reference.detach())
        kl = _plogp(p) - torch.xlogy(p, q.clamp_min(TINY))
        return kl.sum(dim=-1).mean()


def map_entropy(current: torch.Tensor) -> torch.Tensor:
    """CLS->patch entropy (nats) of every map: ``[B, L, H, N] -> [B, L, H]``, float32,
    differentiable with a finite gradient at exact zeros."""
    _check_maps("current", current)
    with _no_autocast(current):
        return -_plogp(_f32(current)).sum(dim=-1)


def layer_entropy(current: torch.Tensor) -> torch.Tensor:
    """Mean CLS->patch entropy (nats) per layer over images and heads: ``[B, L, H, N] -> [L]``,
    float32, differentiable with a finite gradient at exact zeros."""
    return map_entropy(current).mean(dim=(0, 2))


def _floor_start(state: dict[str, Any], layer_entropy: Sequence[float]) -> dict[str, Any]:
    layers = state["layers"] if state["layers"] is not None else range(len(layer_entropy))
    tau = entropy_floor_targets([layer_entropy[i] for i in layers], state["ratio"])
    return {**state, "tau": tau.to(state["device"])}


@register_regularizer(
    "entropy_floor", start=_floor_start,
    prepare=lambda pre: {"layers": pre.layers, "ratio": pre.ratio, "device": pre.device},
    penalty=lambda state, b: entropy_floor_loss(b.maps, state["tau"]))
def entropy_floor_loss(current: torch.Tensor, tau: torch.Tensor | Sequence[float], *,
                       reduction: Literal["sum", "mean"] = "sum") -> torch.Tensor:
    """Entropy floor, the study's hinge per map (003 §3.7.2, R2):
    ``sum_l mean_{b,h} relu(tau_l - H_{b,l,h})``, ``H_{b,l,h}`` the entropy of image ``b``'s
    CLS->patch map in head ``h`` of layer ``l``.

    The hinge acts on each map, not on the layer mean: a layer whose mean entropy is above its
    floor is still penalised for the maps below it (at ratio 0.7 on the tiny CLIP a third of
    the maps are below at step 0 while every layer mean is above). Layer penalties are added
    (``reduction="sum"``, the default, as the study did), so lambda multiplies each layer's
    mean shortfall; with ``"mean"`` lambda means the same at any depth. Zero (and no gradient)
    while every map is above its floor; below, the gradient raises that map's entropy.

    Args:
        current: ``[B, L, H, N]`` CLS->patch maps (with a graph).
        tau: ``[L]`` floors in nats (``entropy_floor_targets``).

    Returns:
        float32 scalar.
    """
    h = map_entropy(current)
    tau_t = torch.as_tensor(tau, dtype=h.dtype, device=h.device)
    if tau_t.shape != h.shape[1:2]:
        raise ValueError(f"tau has shape {tuple(tau_t.shape)}, expected [{h.shape[1]}] "
                         "(one floor per captured layer)")
    shortfall = torch.relu(tau_t[None, :, None] - h).mean(dim=(0, 2))  # [L]
    return shortfall.sum() if reduction == "sum" else shortfall.mean()


def entropy_floor_targets(pretrained_layer_entropy: torch.Tensor | Sequence[float],
                          ratio: float = 0.7) -> torch.Tensor:
    """Floors ``tau_l = ratio * H_l(pretrained)``, ``[L]`` float32 (e.g. from a run record's
    ``baseline["entropy"]["layers"]``)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return ratio * torch.as_tensor(pretrained_layer_entropy, dtype=torch.float32).detach()


def _l2sp_prepare(pre: Pretrained) -> dict[str, Any]:
    """The pretrained values of every trainable tensor but the head (trained from scratch)."""
    return {"ref": {n: p.detach().clone() for n, p in pre.model.named_parameters()
                    if p.requires_grad and not n.startswith("head.")}}


def _l2sp_penalty(state: dict[str, Any], b: Batch) -> torch.Tensor:
    ref = state["ref"]
    return l2sp_loss({n: p for n, p in b.model.named_parameters() if n in ref}, ref)


@register_regularizer("l2sp", prepare=_l2sp_prepare, penalty=_l2sp_penalty)
def l2sp_loss(params: dict[str, torch.Tensor],
              reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_k ||params[k] - reference[k]||^2`` (no 1/2), float32 scalar.

    Args:
        params: the trainable tensors to pull back, by name (e.g. ``named_parameters()``).
        reference: their pretrained values under the same names (constants).

    Raises:
        KeyError: if a name in ``params`` has no reference.
    """
    missing = [k for k in params if k not in reference]
    if missing:
        raise KeyError(f"no reference for {len(missing)} tensors, e.g. {missing[:3]}")
    if not params:
        raise ValueError("params is empty")
    total: torch.Tensor | None = None
    with _no_autocast(next(iter(params.values()))):
        for key, p in params.items():
            r = reference[key].detach().to(device=p.device)
            term = (_f32(p) - _f32(r)).pow(2).sum()
            total = term if total is None else total + term
    return total
