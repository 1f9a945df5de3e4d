"""Weight-space and embedding-space drift of a fine-tuned vision tower from its pretrained self.

``weight_drift`` is the relative Frobenius distance ``||W - W0|| / ||W0||`` over every
parameter of the vision tower, in total and per encoder layer. It is LoRA-aware: for a PEFT
LoRA layer the effective weight is what its forward uses, ``base + B @ A * scaling`` (PEFT's
own ``get_delta_weight``, or a LoRA variant's own merge), so a LoRA run and the same run merged
have the same drift.

References are keyed by stable names: ``"vision_model." + the parameter's path inside the
vision tower``, with PEFT's ``.base_layer`` removed and the adapter tensors left out. So a
snapshot taken from a ``CLIPModel``, a classifier sharing its tower, a bare
``CLIPVisionModel`` or any of them after LoRA injection (``vision_weight_snapshot``) compares
with any other of them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attndrift.probes.capture import find_encoder_layers, find_vision_tower

__all__ = ["effective_vision_weights", "embedding_drift", "vision_weight_snapshot",
           "weight_drift"]

PREFIX = "vision_model."


def _is_lora_layer(module: nn.Module) -> bool:
    # Duck-typed PEFT LoraLayer (no peft import needed to inspect a plain model).
    return all(hasattr(module, a) for a in ("lora_A", "base_layer", "get_delta_weight"))


def _stable(name: str) -> str:
    return PREFIX + ".".join(p for p in name.split(".") if p != "base_layer")


def _effective_lora_weight(module: nn.Module) -> torch.Tensor:
    """The weight a PEFT LoRA layer's forward applies, mirroring its branches: disabled ->
    base without merged deltas; merged -> base as is; else base + active adapters' deltas.
    An adapter of a LoRA variant (DoRA, ...) is applied by the variant's own merge
    (``lora_variant[a].merge_safe``), which is what PEFT's ``merge`` folds in."""
    weight = module.base_layer.weight
    variants = getattr(module, "lora_variant", {}) or {}
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    if module.disable_adapters:
        if any(a in variants for a in module.merged_adapters):
            raise NotImplementedError("weight drift of a disabled, merged LoRA variant adapter "
                                      "(DoRA, ...) is not supported; unmerge it first")
        for a in module.merged_adapters:
            weight = weight - module.get_delta_weight(a)
        return weight
    if module.merged:
        return weight
    for a in adapters:
        if a in variants:
            weight = variants[a].merge_safe(module, a, weight)
        else:
            weight = weight + module.get_delta_weight(a)
    return weight


def effective_vision_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of the vision tower in ``model`` as its forward uses it, by stable name.

    Not detached and not copied (use ``vision_weight_snapshot`` for a reference).
    """
    tower = find_vision_tower(model)
    lora_weights: dict[str, torch.Tensor] = {}
    for name, module in tower.named_modules():
        if _is_lora_layer(module):
            lora_weights[f"{name}.weight"] = _effective_lora_weight(module)
    out: dict[str, torch.Tensor] = {}
    for name, param in tower.named_parameters():
        if any(part.startswith("lora_") for part in name.split(".")):
            continue  # adapter tensors: already inside the effective weight
        key = _stable(name)
        out[key] = lora_weights.get(key[len(PREFIX):], param)
    return out


@torch.no_grad()
def vision_weight_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the effective vision-tower weights (the drift reference)."""
    return {k: v.detach().clone() for k, v in effective_vision_weights(model).items()}


def _layer_prefixes(model: nn.Module) -> list[str]:
    tower = find_vision_tower(model)
    layers = find_encoder_layers(model)
    path = next(name for name, module in tower.named_modules() if module is layers)
    return [f"{_stable(path)}.{i}." for i in range(len(layers))]


@torch.no_grad()
def weight_drift(model: nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Relative Frobenius distance of the vision tower's effective weights from ``reference``.

    ``total = sqrt(sum ||W - W0||^2) / sqrt(sum ||W0||^2)`` over every tower parameter (weights,
    biases, norms, embeddings), and ``per_layer[i]`` the same over encoder layer ``i``'s
    parameters. Accumulated in float64.

    Args:
        model: anything holding a supported vision tower (plain, classifier, PEFT-wrapped).
        reference: ``vision_weight_snapshot`` of the pretrained model.

    Returns:
        ``{"total": float, "per_layer": [L floats]}``.

    Raises:
        ValueError: if the tensor names or shapes differ from the reference's.
    """
    current = effective_vision_weights(model)
    if set(current) != set(reference):
        diff = sorted(set(current) ^ set(reference))
        raise ValueError(f"model and reference hold different vision tensors ({len(diff)}, "
                         f"e.g. {diff[:3]}); take the reference with vision_weight_snapshot")
    prefixes = _layer_prefixes(model)
    sq_diff = [0.0] * (len(prefixes) + 1)  # slot 0: total; slot i + 1: layer i
    sq_ref = [0.0] * (len(prefixes) + 1)
    for key, weight in current.items():
        ref = reference[key]
        if ref.shape != weight.shape:
            raise ValueError(f"{key}: shape {tuple(weight.shape)} vs reference "
                             f"{tuple(ref.shape)}")
        w0 = ref.to(device=weight.device, dtype=torch.float64)
        d = float((weight.to(torch.float64) - w0).pow(2).sum())
        r = float(w0.pow(2).sum())
        slots = [0] + [i + 1 for i, p in enumerate(prefixes) if key.startswith(p)]
        for slot in slots:
            sq_diff[slot] += d
            sq_ref[slot] += r
    rel = [math.sqrt(d) / math.sqrt(r) if r > 0 else (0.0 if d == 0 else math.inf)
           for d, r in zip(sq_diff, sq_ref, strict=True)]
    return {"total": rel[0], "per_layer": rel[1:]}


def embedding_drift(a: torch.Tensor, b: torch.Tensor) -> float:
    """``1 - mean_i cos(a_i, b_i)`` of paired embeddings ``[n, D]`` (e.g. pretrained vs
    fine-tuned image embeddings of the same images); 0 = same directions. Float32 or better;
    a zero vector has cosine 0 with anything."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b must both be [n, D], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    cos = F.cosine_similarity(a.detach().to(dtype), b.detach().to(dtype), dim=-1)
    return 1.0 - cos.mean().item()
