"""A ``save_pretrained`` CLIP checkpoint (directory or hub id) loaded onto its reference.

A fine-tune saved from a ``CLIPForImageClassification`` or a ``CLIPVisionModel`` holds the
vision tower only; loaded as a ``CLIPModel``, its text tower, projections and logit scale would
be randomly initialised and zero-shot scored on noise. transformers' loading info names every
tensor the checkpoint lacks (``output_loading_info=True``): a missing vision-tower tensor is
refused (the vision tower is what is measured), anything else missing (text tower, text and
visual projection, logit scale) is taken from the reference, and the record names those parts
(`fill_from_reference`). Tensors the CLIPModel has no place for (a ``classifier`` head) are
counted and left out. Weight files are checked before transformers reads them
(`attndrift.models.weights.check_weight_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from attndrift.models.clip import LoadedCLIP
from attndrift.models.errors import ArchitectureMismatch, ExternalModelError
from attndrift.models.weights import check_weight_dir, read_json_object

# Config fields that must agree between a fine-tuned checkpoint and its reference.
_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "patch_size", "image_size", "num_channels", "hidden_act")
_TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size", "max_position_embeddings", "hidden_act")
# what a CLIPModel tensor belongs to, for the record (first matching prefix)
PARTS = (("vision_model.", "vision tower"), ("visual_projection.", "visual projection"),
         ("text_model.", "text tower"), ("text_projection.", "text projection"),
         ("logit_scale", "logit scale"))


def part_of(key: str) -> str:
    return next((name for prefix, name in PARTS if key.startswith(prefix)), key)


def check_architecture(reference: Any, finetuned: Any, what: str) -> None:
    """Raise `ArchitectureMismatch` naming the first config field where the CLIP configs
    ``finetuned`` and ``reference`` differ."""
    pairs = [
        ("vision", f, reference.vision_config, finetuned.vision_config) for f in _VISION_FIELDS
    ]
    pairs += [("text", f, reference.text_config, finetuned.text_config) for f in _TEXT_FIELDS]
    pairs.append(("", "projection_dim", reference, finetuned))
    for tower, name, ref, ft in pairs:
        a, b = getattr(ref, name, None), getattr(ft, name, None)
        if a != b:
            raise ArchitectureMismatch(
                f"{what} does not match the reference's architecture: {tower} {name} is "
                f"{b} there and {a} in the reference".replace("  ", " ")
            )


def fill_from_reference(clip: nn.Module, reference: nn.Module, info: dict[str, Any],
                        what: str) -> list[str]:
    """Copy the reference's tensors over those ``clip`` did not find in its checkpoint
    (``info``: transformers' loading info); the parts filled, in CLIPModel order. Refuses a
    checkpoint that lacks vision-tower tensors or holds tensors of another shape."""
    if info.get("mismatched_keys"):
        key = next(iter(info["mismatched_keys"]))
        key = key[0] if isinstance(key, tuple) else key
        raise ArchitectureMismatch(f"{what} does not match the reference's architecture: "
                                   f"{key} has another shape")
    missing = sorted(info.get("missing_keys") or [])
    vision = [k for k in missing if part_of(k) == "vision tower"]
    if vision:
        raise ArchitectureMismatch(
            f"{what} lacks {len(vision)} vision-tower tensors, e.g. {vision[0]}: not a "
            "fine-tune of the reference's vision tower (it would be measured on random "
            "weights); save the whole fine-tuned model with save_pretrained"
        )
    if not missing:
        return []
    own = reference.state_dict()
    clip.load_state_dict({k: own[k].clone() for k in missing}, strict=False)
    filled = {part_of(k) for k in missing}
    return [name for _, name in PARTS if name in filled]


def _from_pretrained(source: str):
    from transformers import CLIPModel

    path = Path(source)
    try:
        return CLIPModel.from_pretrained(source, attn_implementation="sdpa",
                                         dtype=torch.float32, output_loading_info=True)
    except OSError as err:
        if path.is_dir():
            raise ExternalModelError(
                f"{source}: not a loadable CLIP checkpoint ({type(err).__name__})"
            ) from None
        raise FileNotFoundError(
            f"{source}: no such directory, and not a hub id available here ({type(err).__name__})"
        ) from None
    except Exception as err:  # ValueError, KeyError, TypeError, SafetensorError, ...
        why = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if "weights_only" in why or "pickle" in why.lower():
            why = "a pickle that holds more than tensors"  # never advise unpickling
        raise ExternalModelError(f"{source}: not a CLIPModel checkpoint ({why})") from None


def _tokenizer(source: str, clip: nn.Module, reference: LoadedCLIP, filled: list[str]) -> Any:
    """The checkpoint's own tokenizer when it ships one and its text tower is its own."""
    from transformers import AutoTokenizer

    path = Path(source)
    has_files = not path.is_dir() or any(
        (path / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    )
    if "text tower" in filled or not has_files:
        return reference.tokenizer
    try:
        own = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        return reference.tokenizer
    # offline, transformers can return a near-empty tokenizer without error
    return own if len(own) >= min(10, clip.config.text_config.vocab_size) else reference.tokenizer


def load_saved_clip(source: str, reference: LoadedCLIP):
    """``(clip, tokenizer, mean, std, details)`` of a ``save_pretrained`` CLIP checkpoint, with
    its own tokenizer and image statistics where it ships them, else the reference's (a
    fine-tune keeps both), and parts it lacks from the reference (``details["from_reference"]``).
    """
    from attndrift.models.clip import _image_stats

    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ExternalModelError(f"{source}: no config.json (not a save_pretrained directory)")
        read_json_object(path / "config.json")
        check_weight_dir(path)
    clip, info = _from_pretrained(source)
    check_architecture(reference.model.config, clip.config, source)
    filled = fill_from_reference(clip, reference.model, info, source)
    extra = sorted(info.get("unexpected_keys") or [])
    mean, std = reference.mean, reference.std
    if not path.is_dir() or (path / "preprocessor_config.json").is_file():
        mean, std = _image_stats(source)
    clip.eval()
    details = {
        "architectures": getattr(clip.config, "architectures", None),
        "from_reference": filled,
        "ignored": {"tensors": len(extra), "e.g.": extra[0]} if extra else None,
        "head_classes": _head_classes(extra, clip.config),
    }
    return clip, _tokenizer(source, clip, reference, filled), mean, std, details


def _head_classes(extra: list[str], config: Any) -> int | None:
    """The class count of a classification head saved in the checkpoint, if it holds one."""
    if not any(k.startswith(("classifier.", "head.")) for k in extra):
        return None
    return int(getattr(config, "num_labels", 0) or 0) or None
