"""Adaptation methods: which parameters of a `CLIPClassifier` train. One registry entry each.

Every method takes the classifier and flat keyword arguments, sets ``requires_grad`` in place,
and returns an `Adapted` handle. The text tower is never part of the classifier, so it is
always frozen. A method's metadata (label, the config keys its keyword arguments are read
from, interpolation scheme, colour) is its `attndrift.methods.MethodSpec` of the same name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from attndrift.methods import METHODS as SPECS
from attndrift.models.classifier import CLIPClassifier


@dataclass
class Adapted:
    """``model`` is what trains and runs (LoRA layers are injected into it in place);
    ``peft`` is the PEFT wrapper for LoRA (merge, disable, save), else None."""

    model: CLIPClassifier
    method: str
    peft: nn.Module | None = None


METHODS: dict[str, Callable[..., Adapted]] = {}


def register_method(name: str) -> Callable[[Callable[..., Adapted]], Callable[..., Adapted]]:
    """Register the builder of the method ``name``; its `MethodSpec` must exist."""
    def wrap(fn: Callable[..., Adapted]) -> Callable[..., Adapted]:
        if name not in SPECS or name in METHODS:
            raise ValueError(f"method {name!r}: no MethodSpec in attndrift.methods, or "
                             "registered twice")
        METHODS[name] = fn
        return fn

    return wrap


def adapt(model: CLIPClassifier, method: str, **kwargs) -> Adapted:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](model, **kwargs)


def method_kwargs(method: str, config: dict[str, Any]) -> dict[str, Any]:
    """The flat keyword arguments of ``method`` from a run config dump (nested dict), as its
    `MethodSpec.kwargs` maps them."""
    out = {}
    for arg, key in SPECS[method].kwargs.items():
        node: Any = config
        for part in key.split("."):
            node = node[part]
        out[arg] = node
    return out


def encoder_layers(model: CLIPClassifier) -> nn.ModuleList:
    return model.vision_model.encoder.layers


@register_method("full_ft")
def full_ft(model: CLIPClassifier) -> Adapted:
    """Vision tower, visual projection and head all train."""
    model.requires_grad_(True)
    return Adapted(model, "full_ft")


@register_method("linear_probe")
def linear_probe(model: CLIPClassifier) -> Adapted:
    """Only the linear head trains."""
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    return Adapted(model, "linear_probe")


@register_method("freeze")
def freeze(model: CLIPClassifier, *, layers: int) -> Adapted:
    """The first ``layers`` encoder layers are frozen; everything else trains, the patch and
    position embeddings and the pre-layernorm included (the study's A3, 003 §2.4 / §3.5, froze
    the first k encoder layers only)."""
    n = len(encoder_layers(model))
    if not 1 <= layers <= n:
        raise ValueError(f"freeze_layers={layers} but the vision tower has {n} layers; "
                         f"choose 1..{n}")
    model.requires_grad_(True)
    for layer in encoder_layers(model)[:layers]:
        layer.requires_grad_(False)
    return Adapted(model, "freeze")


@register_method("last_block")
def last_block(model: CLIPClassifier) -> Adapted:
    """The later protocol's reference: the last encoder layer, the post-layernorm, the visual
    projection and the head train; the embeddings, the pre-layernorm and every other encoder
    layer are frozen."""
    model.requires_grad_(False)
    for module in (encoder_layers(model)[-1], model.vision_model.post_layernorm,
                   model.visual_projection, model.head):
        module.requires_grad_(True)
    return Adapted(model, "last_block")


@register_method("lora")
def lora(model: CLIPClassifier, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
         targets: Sequence[str] = ("q_proj", "v_proj"), train_projection: bool = True,
         **variant: Any) -> Adapted:
    """PEFT LoRA on the vision attention projections ``targets``; the head and (with
    ``train_projection``, the study's setting) the visual projection stay trainable as full
    tensors, everything else is frozen. ``variant``: further `peft.LoraConfig` options of a
    LoRA variant (e.g. ``use_dora=True``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(targets), bias="none", **variant)
    # get_peft_model freezes every base parameter and injects LoRA layers into `model` in place.
    wrapper = get_peft_model(model, config)
    model.visual_projection.requires_grad_(train_projection)
    model.head.requires_grad_(True)
    return Adapted(model, "lora", wrapper)


@register_method("dora")
def dora(model: CLIPClassifier, **lora_options: Any) -> Adapted:
    """DoRA (Liu et al., 2024): `lora` with each adapted weight decomposed into a trained
    magnitude per output row and a LoRA-updated direction (PEFT's ``use_dora=True``); takes
    `lora`'s options."""
    return replace(lora(model, **lora_options, use_dora=True), method="dora")


def merge_lora(adapted: Adapted) -> CLIPClassifier:
    """Fold the LoRA deltas into the base weights (W + B@A*scale) and drop the LoRA layers."""
    if adapted.peft is None:
        return adapted.model
    return adapted.peft.merge_and_unload()
