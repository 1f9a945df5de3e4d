"""Adaptation methods: which parameters of a `CLIPClassifier` train. One registry entry each.

Every method takes the classifier and flat keyword arguments, sets ``requires_grad`` in place,
and returns an `Adapted` handle. The text tower is never part of the classifier, so it is
always frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

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
    def wrap(fn: Callable[..., Adapted]) -> Callable[..., Adapted]:
        METHODS[name] = fn
        return fn

    return wrap


def adapt(model: CLIPClassifier, method: str, **kwargs) -> Adapted:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](model, **kwargs)


def method_kwargs(method: str, lora: dict, freeze_layers: int) -> dict:
    """The flat keyword arguments of ``method`` from a run config's fields."""
    if method == "lora":
        return {"r": lora["r"], "alpha": lora["alpha"], "dropout": lora["dropout"],
                "targets": lora["targets"]}
    if method == "freeze":
        return {"layers": freeze_layers}
    return {}


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


@register_method("lora")
def lora(model: CLIPClassifier, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
         targets: Sequence[str] = ("q_proj", "v_proj")) -> Adapted:
    """PEFT LoRA on the vision attention projections ``targets``; the visual projection and
    the head stay trainable (the study's setting), everything else is frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(targets), bias="none")
    # get_peft_model freezes every base parameter and injects LoRA layers into `model` in place.
    wrapper = get_peft_model(model, config)
    model.visual_projection.requires_grad_(True)
    model.head.requires_grad_(True)
    return Adapted(model, "lora", wrapper)


def merge_lora(adapted: Adapted) -> CLIPClassifier:
    """Fold the LoRA deltas into the base weights (W + B@A*scale) and drop the LoRA layers."""
    if adapted.peft is None:
        return adapted.model
    return adapted.peft.merge_and_unload()
