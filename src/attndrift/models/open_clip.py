"""open_clip's OpenAI-style ViT state dicts onto transformers ``CLIPModel`` names.

A key mapping instead of open_clip itself: open_clip_torch needs torchvision, which here
would pull a multi-GB CUDA torch, and a mapped checkpoint is measured through the same
capture path (q_proj/k_proj hooks) as every other model. tests/test_measure.py checks the
mapped model against an open_clip-style forward written in plain torch.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attndrift.models.errors import ArchitectureMismatch, ExternalModelError
from attndrift.models.saved_clip import PARTS, part_of

# open_clip's OpenAI-style ViTs: (patch size, width, layers, image size).
OPEN_CLIP_VITS = {
    "ViT-B-32": (32, 768, 12, 224),
    "ViT-B-16": (16, 768, 12, 224),
    "ViT-L-14": (14, 1024, 24, 224),
    "ViT-L-14-336": (14, 1024, 24, 336),
}


# --- open_clip -> transformers CLIPModel -----------------------------------------------------

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_FIXED = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {
    "visual.proj": "visual_projection.weight",
    "text_projection": "text_projection.weight",
}
_IGNORED = ("attn_mask",)  # open_clip's causal-mask buffer: CLIPModel builds its own


def open_clip_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenAI-style open_clip ViT state dict to transformers ``CLIPModel`` names.

    ``resblocks.{i}.attn.in_proj_weight`` ``[3W, W]`` (and ``in_proj_bias``) is split into
    ``q_proj``/``k_proj``/``v_proj`` in that order (``nn.MultiheadAttention``'s packing);
    ``visual.proj`` ``[W, D]`` and ``text_projection`` ``[W, D]`` are applied as ``x @ proj``
    and become the transposed ``Linear`` weights ``[D, W]``; ``conv1`` (no bias), class and
    positional embeddings, ``ln_pre``/``ln_post``/``ln_final``, the blocks' ``ln_1``/``ln_2``,
    ``mlp.c_fc``/``c_proj`` and ``logit_scale`` map one to one. A text tower is optional (a
    vision-only checkpoint keeps the reference's).

    Raises:
        ExternalModelError: tensors no OpenAI-style ViT has (ResNet towers, attention pooling,
        layer scale, ...), named.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    block = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
    for key, value in state.items():
        if key in _FIXED:
            out[_FIXED[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif key in _IGNORED:
            continue
        elif m := block.fullmatch(key):
            tower = "vision_model" if m[1] else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m[2]}", m[3]
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[-1]  # weight | bias
                for proj, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                    out[f"{prefix}.self_attn.{proj}_proj.{kind}"] = part.contiguous()
                continue
            module, _, kind = rest.rpartition(".")
            if module not in _BLOCK:
                unknown.append(key)
                continue
            out[f"{prefix}.{_BLOCK[module]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ExternalModelError(
            f"not an OpenAI-style open_clip ViT checkpoint: {len(unknown)} tensors have no "
            f"CLIPModel counterpart, e.g. {', '.join(unknown[:3])}"
        )
    if "vision_model.embeddings.patch_embedding.weight" not in out:
        raise ExternalModelError("not an open_clip ViT checkpoint: no visual.conv1.weight")
    return out


def check_open_clip_name(name: str, reference: Any) -> None:
    """Refuse an open_clip model name that is not an OpenAI-style ViT or not the reference's
    architecture. ``-quickgelu`` names need a QuickGELU reference; plain names are taken with
    the reference's activation (open_clip itself forces QuickGELU for OpenAI weights)."""
    base = name.removesuffix("-quickgelu")
    if base not in OPEN_CLIP_VITS:
        raise ExternalModelError(
            f"open_clip model {name!r} is not supported; OpenAI-style ViTs "
            f"only: {', '.join(OPEN_CLIP_VITS)} (optionally -quickgelu)"
        )
    vision = reference.vision_config
    patch, width, layers, size = OPEN_CLIP_VITS[base]
    have = (vision.patch_size, vision.hidden_size, vision.num_hidden_layers, vision.image_size)
    if have != (patch, width, layers, size):
        raise ArchitectureMismatch(
            f"open_clip model {name} (patch {patch}, width {width}, {layers} layers, {size} px) "
            f"is not the reference's architecture (patch {have[0]}, width {have[1]}, "
            f"{have[2]} layers, {have[3]} px)"
        )
    if name.endswith("-quickgelu") and vision.hidden_act != "quick_gelu":
        raise ArchitectureMismatch(
            f"open_clip model {name} uses QuickGELU, the reference {vision.hidden_act}"
        )


def load_open_clip(
    path: Path, reference: Any, model_name: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of the reference CLIPModel (``reference``: a `LoadedCLIP`) holding the open_clip
    checkpoint's weights, and details (which towers the checkpoint held). Every vision tensor
    must come from the checkpoint; a text tower it lacks stays the reference's."""
    from attndrift.models.weights import read_state_dict, regular_file

    if model_name is not None:
        check_open_clip_name(model_name, reference.model.config)
    mapped = open_clip_to_hf(read_state_dict(regular_file(path)))
    clip = copy.deepcopy(reference.model)
    own = clip.state_dict()
    for key, value in mapped.items():
        if key not in own:
            raise ArchitectureMismatch(
                f"{path.name} does not match the reference's architecture: {key} does not "
                "exist there"
            )
        if own[key].shape != value.shape:
            raise ArchitectureMismatch(
                f"{path.name} does not match the reference's architecture: {key} has shape "
                f"{tuple(value.shape)}, the reference {tuple(own[key].shape)}"
            )
    vision = [k for k in own if k.startswith(("vision_model.", "visual_projection."))]
    missing = [k for k in vision if k not in mapped]
    if missing:
        raise ArchitectureMismatch(
            f"{path.name} does not match the reference's architecture: "
            f"it lacks {len(missing)} vision tensors, e.g. {missing[0]}"
        )
    clip.load_state_dict(mapped, strict=False)
    has_text = any(k.startswith("text_model.") for k in mapped)
    lacking = {part_of(k) for k in own if k not in mapped}
    filled = [name for _, name in PARTS if name in lacking]
    return clip, {"open_clip_model": model_name, "text_tower_in_checkpoint": has_text,
                  "from_reference": filled}

