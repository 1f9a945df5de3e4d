"""Load a CLIP fine-tuned elsewhere next to its pretrained reference (``attndrift measure``).

Formats of FINETUNED (``detect_format``):

- ``run``: an attndrift run directory (``record.json`` + ``final.safetensors``), rebuilt by
  `restore_run` (its classification head included).
- ``clip``: a transformers ``save_pretrained`` CLIPModel directory, or a hub id.
- ``peft``: a PEFT adapter directory (``adapter_config.json``), applied to a copy of the
  reference; adapters on the text tower change the text tower too.
- ``open_clip``: an open_clip checkpoint file (a state dict, or a training checkpoint holding
  one under ``state_dict``; ``.safetensors``, or ``.pt``/``.pth``/``.bin`` read with
  ``weights_only=True``) of an OpenAI-style ViT, mapped onto a copy of the reference's
  transformers CLIPModel by `attndrift.models.open_clip.open_clip_to_hf`.

Why a key mapping and not open_clip itself: open_clip_torch needs torchvision, which here
would pull a multi-GB CUDA torch; and a checkpoint mapped into ``CLIPModel`` goes through the
very capture path (q_proj/k_proj hooks) the reference goes through, so both are measured by
the same code. The architecture (widths, depths, heads, patch and image size, activation)
is the reference's: a fine-tune keeps the architecture of what it was fine-tuned from, and a
checkpoint whose tensors do not fit it is refused (`ArchitectureMismatch`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attndrift.models.classifier import CLIPClassifier
from attndrift.models.clip import LoadedCLIP
from attndrift.models.errors import ArchitectureMismatch, ExternalModelError
from attndrift.records import RECORD_FILE, file_sha256

FORMATS = ("run", "clip", "peft", "open_clip")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")

# Config fields that must agree between a fine-tuned checkpoint and its reference.
_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "patch_size",
    "image_size",
    "num_channels",
    "hidden_act",
)
_TEXT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
    "hidden_act",
)


@dataclass
class Finetuned:
    """A fine-tuned CLIP ready to measure: ``clip`` exposes ``text_model``/``text_projection``
    (its own text tower, possibly fine-tuned), ``classifier`` shares its vision tower and
    projection; ``has_head`` says whether ``classifier.head`` was trained (run directories)."""

    clip: nn.Module
    classifier: CLIPClassifier
    has_head: bool
    tokenizer: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    format: str
    source: str
    sha256: str | None
    details: dict[str, Any] = field(default_factory=dict)


def detect_format(source: str) -> str:
    """The format of FINETUNED ``source`` (see the module docstring).

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ExternalModelError: a directory or file of no known format.
    """
    path = Path(source)
    if path.is_dir():
        if (path / RECORD_FILE).is_file():
            return "run"
        if (path / "adapter_config.json").is_file():
            return "peft"
        if (path / "config.json").is_file():
            return "clip"
        raise ExternalModelError(
            f"{source}: unknown format (a directory without record.json, adapter_config.json "
            "or config.json); give an attndrift run directory, a save_pretrained CLIP "
            "directory, a PEFT adapter directory or an open_clip checkpoint file"
        )
    if path.is_file():
        if path.suffix in WEIGHT_SUFFIXES:
            return "open_clip"
        raise ExternalModelError(
            f"{source}: unknown format (a {path.suffix or 'suffix-less'} "
            f"file; open_clip checkpoints end in "
            f"{', '.join(WEIGHT_SUFFIXES)})"
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith("."):
        return "clip"  # a hub id such as openai/clip-vit-base-patch32
    raise FileNotFoundError(f"{source}: no such file or directory")


def checkpoint_sha256(source: str) -> str | None:
    """16 hex of the checkpoint's weights: a file's bytes; for a directory, its weight files
    (names and bytes, sorted); for a hub id, the cached ``model.safetensors`` if any."""
    path = Path(source)
    if path.is_file():
        return file_sha256(path, 16)
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix in WEIGHT_SUFFIXES and p.name != "attention.safetensors"
        )
        if not files:
            return None
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}:{file_sha256(p)}\n".encode())
        return h.hexdigest()[:16]
    try:
        from transformers.utils import cached_file

        found = cached_file(
            source, "model.safetensors", _raise_exceptions_for_missing_entries=False
        )
    except OSError:
        return None
    return file_sha256(Path(found), 16) if found else None


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


def _tower_differs(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) != set(sb) or any(not torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


def text_tower_changed(finetuned: nn.Module, reference: nn.Module) -> bool:
    """Whether the text tower or text projection of ``finetuned`` differs from the reference's
    (effective weights: a PEFT model is merged into a copy first)."""
    ft = finetuned
    if any(".lora_" in n for n, _ in ft.text_model.named_parameters()):
        ft = _merged_copy(ft)
    return _tower_differs(ft.text_model, reference.text_model) or _tower_differs(
        ft.text_projection, reference.text_projection
    )


def _merged_copy(clip: nn.Module) -> nn.Module:
    """A copy of a LoRA-injected CLIPModel with every LoRA layer merged and removed."""
    from peft.tuners.lora import LoraLayer

    clip = copy.deepcopy(clip)
    for name, module in list(clip.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = clip.get_submodule(name.rsplit(".", 1)[0]) if "." in name else clip
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return clip


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a torch file read with
    ``weights_only=True`` (a training checkpoint's ``state_dict``; DDP's ``module.`` prefix
    removed)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle of a whole module, corrupt file, ...
            raise ExternalModelError(
                f"{path}: not a loadable state dict ({type(err).__name__}); save "
                "model.state_dict() (only tensors are read from torch files)"
            ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExternalModelError(f"{path}: not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_open_clip(
    path: Path, reference: LoadedCLIP, model_name: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of the reference CLIPModel holding the open_clip checkpoint's weights, and
    details (which towers the checkpoint held)."""
    from attndrift.models.open_clip import check_open_clip_name, open_clip_to_hf

    if model_name is not None:
        check_open_clip_name(model_name, reference.model.config)
    mapped = open_clip_to_hf(read_state_dict(path))
    clip = copy.deepcopy(reference.model)
    own = clip.state_dict()
    for key, value in mapped.items():
        if key not in own:
            raise ArchitectureMismatch(
                f"{path.name} does not match the reference's "
                f"architecture: {key} does not exist there"
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
    return clip, {"open_clip_model": model_name, "text_tower_in_checkpoint": has_text}


def load_peft(path: Path, reference: LoadedCLIP) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of the reference CLIPModel with the PEFT adapter in ``path`` injected (LoRA
    layers in place, unmerged), and details. Every tensor of the adapter must find its
    module: an adapter trained on a ``CLIPModel``, ``CLIPVisionModel`` or attndrift's
    classifier addresses ``vision_model...`` modules, which all of them share."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    config = json.loads((path / "adapter_config.json").read_text())
    files = [path / n for n in ("adapter_model.safetensors", "adapter_model.bin")]
    weights = next((f for f in files if f.is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors (or .bin)")
    saved = read_state_dict(weights)
    clip = copy.deepcopy(reference.model)
    try:
        wrapped = PeftModel.from_pretrained(clip, str(path), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ArchitectureMismatch(
            f"{path} does not fit the reference: {str(err).splitlines()[0][:300]}"
        ) from None
    loaded = get_peft_model_state_dict(wrapped)
    stray = [k for k in saved if k not in loaded]
    if stray:
        raise ArchitectureMismatch(
            f"{path}: {len(stray)} adapter tensors address modules the "
            f"reference does not have, e.g. {stray[0]}"
        )
    for key, value in saved.items():
        if loaded[key].shape != value.shape:
            raise ArchitectureMismatch(
                f"{path}: {key} has shape {tuple(value.shape)}, the "
                f"reference's module {tuple(loaded[key].shape)}"
            )
    model = wrapped.base_model.model  # the CLIPModel, LoRA layers injected in place
    model.eval()
    return model, {
        "peft_type": config.get("peft_type"),
        "r": config.get("r"),
        "target_modules": config.get("target_modules"),
        "base_model": config.get("base_model_name_or_path"),
    }


def _load_clip_checkpoint(source: str, reference: LoadedCLIP):
    """A ``save_pretrained`` CLIPModel (directory or hub id) with its own tokenizer and image
    statistics where it ships them, else the reference's (a fine-tune keeps both)."""
    from transformers import AutoTokenizer, CLIPModel

    from attndrift.models.clip import _image_stats

    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ExternalModelError(f"{source}: no config.json (not a save_pretrained directory)")
    try:
        clip = CLIPModel.from_pretrained(source, attn_implementation="sdpa", dtype=torch.float32)
    except OSError as err:
        if path.is_dir():
            raise ExternalModelError(
                f"{source}: not a loadable CLIP checkpoint ({type(err).__name__})"
            ) from None
        raise FileNotFoundError(
            f"{source}: no such directory, and not a hub id available here ({type(err).__name__})"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise ExternalModelError(
            f"{source}: not a CLIPModel checkpoint ({str(err).splitlines()[0][:200]})"
        ) from None
    tokenizer = reference.tokenizer
    has_files = not path.is_dir() or any(
        (path / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    )
    if has_files:
        try:
            own = AutoTokenizer.from_pretrained(source)
            # offline, transformers can return a near-empty tokenizer without error
            if len(own) >= min(10, clip.config.text_config.vocab_size):
                tokenizer = own
        except (OSError, ValueError):
            pass
    mean, std = reference.mean, reference.std
    if not path.is_dir() or (path / "preprocessor_config.json").is_file():
        mean, std = _image_stats(source)
    clip.eval()
    return clip, tokenizer, mean, std


def _vision_classifier(clip: nn.Module) -> CLIPClassifier:
    # The head is never trained here: only the shared vision tower and projection are used.
    return CLIPClassifier(clip.vision_model, clip.visual_projection, 1)


def load_finetuned(
    source: str, reference: LoadedCLIP, fmt: str = "auto", open_clip_model: str | None = None
) -> Finetuned:
    """Load FINETUNED ``source`` of format ``fmt`` (``auto``: `detect_format`) for measuring
    against ``reference``; float32, eval mode, on the CPU.

    Raises:
        FileNotFoundError: missing file; ExternalModelError: unknown format or unreadable
        checkpoint; ArchitectureMismatch: not the reference's architecture.
    """
    if fmt == "auto":
        fmt = detect_format(source)
    elif fmt not in FORMATS:
        raise ExternalModelError(
            f"unknown format {fmt!r}; choose auto or one of {', '.join(FORMATS)}"
        )
    path = Path(source)
    if fmt != "clip" and not path.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    ref_config = reference.model.config
    mean, std, tokenizer = reference.mean, reference.std, reference.tokenizer
    details: dict[str, Any] = {}
    has_head = False
    if fmt == "run":
        from attndrift.models.restore import restore_run
        from attndrift.records import read_record

        loaded, adapted = restore_run(path, "final")
        check_architecture(ref_config, loaded.model.config, source)
        clip, classifier, has_head = loaded.model, adapted.model, True
        mean, std, tokenizer = loaded.mean, loaded.std, loaded.tokenizer
        record = read_record(path)
        details = {
            "run_id": record.get("run_id"),
            "method": record["config"].get("method"),
            "model": record["config"].get("model"),
            "dataset": (record["config"].get("data") or {}).get("dataset"),
            "classes": int(classifier.head.out_features),
        }
    elif fmt == "clip":
        clip, tokenizer, mean, std = _load_clip_checkpoint(source, reference)
        check_architecture(ref_config, clip.config, source)
        classifier = _vision_classifier(clip)
    elif fmt == "peft":
        clip, details = load_peft(path, reference)
        classifier = _vision_classifier(clip)
    else:
        if not path.is_file():
            raise ExternalModelError(f"{source}: an open_clip checkpoint is a file")
        clip, details = load_open_clip(path, reference, open_clip_model)
        classifier = _vision_classifier(clip)
    clip.requires_grad_(False)
    classifier.requires_grad_(False)
    classifier.eval()
    return Finetuned(
        clip,
        classifier,
        has_head,
        tokenizer,
        tuple(mean),
        tuple(std),
        fmt,
        source,
        checkpoint_sha256(source),
        details,
    )
