"""Load a CLIP fine-tuned elsewhere next to its pretrained reference (``attndrift measure``).

Formats of FINETUNED (``detect_format``), each loaded by its own module:

- ``run``: an attndrift run directory (``record.json`` + ``final.safetensors``), rebuilt by
  `restore_run` (its classification head included).
- ``clip``: a transformers ``save_pretrained`` CLIP directory, or a hub id
  (`attndrift.models.saved_clip`: parts it lacks, such as the text tower of a
  ``CLIPForImageClassification``, come from the reference and the record says so).
- ``peft``: a PEFT LoRA adapter directory (``adapter_config.json``), applied to a copy of the
  reference and checked both ways (`attndrift.models.peft_adapter`).
- ``open_clip``: an open_clip checkpoint file of an OpenAI-style ViT, mapped onto a copy of
  the reference's transformers CLIPModel (`attndrift.models.open_clip`).

Why a key mapping and not open_clip itself: open_clip_torch needs torchvision, which here
would pull a multi-GB CUDA torch; and a checkpoint mapped into ``CLIPModel`` goes through the
very capture path (q_proj/k_proj hooks) the reference goes through, so both are measured by
the same code. The architecture (widths, depths, heads, patch and image size, activation)
is the reference's: a fine-tune keeps the architecture of what it was fine-tuned from, and a
checkpoint whose tensors do not fit it is refused (`ArchitectureMismatch`). Every weight file
is read through `attndrift.models.weights` (hostile files are one line, never unpickled).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attndrift.models.classifier import CLIPClassifier
from attndrift.models.clip import LoadedCLIP
from attndrift.models.errors import ArchitectureMismatch, ExternalModelError
from attndrift.models.saved_clip import check_architecture
from attndrift.models.weights import WEIGHT_SUFFIXES, checkpoint_sha256, regular_file
from attndrift.records import RECORD_FILE

FORMATS = ("run", "clip", "peft", "open_clip")
__all__ = ["FORMATS", "ArchitectureMismatch", "ExternalModelError", "Finetuned",
           "check_architecture", "checkpoint_sha256", "detect_format", "load_finetuned",
           "text_tower_changed"]


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


def check_format(fmt: str) -> str:
    """``fmt`` if it is ``auto`` or one of `FORMATS`; else one line naming the choices."""
    if fmt != "auto" and fmt not in FORMATS:
        hint = " (a DoRA adapter is a PEFT adapter: --format peft)" if fmt.lower() in (
            "dora", "lora", "adapter") else ""
        raise ExternalModelError(
            f"unknown --format {fmt!r}; choose auto or one of {', '.join(FORMATS)}{hint}"
        )
    return fmt


def detect_format(source: str) -> str:
    """The format of FINETUNED ``source`` (see the module docstring).

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ExternalModelError: a directory or file of no known format.
    """
    path = Path(source)
    if path.is_dir():
        for name, fmt in ((RECORD_FILE, "run"), ("adapter_config.json", "peft"),
                          ("config.json", "clip")):
            if (path / name).exists():
                return fmt
        raise ExternalModelError(
            f"{source}: unknown format (a directory without record.json, adapter_config.json "
            "or config.json); give an attndrift run directory, a save_pretrained CLIP "
            "directory, a PEFT adapter directory or an open_clip checkpoint file"
        )
    if path.exists() or path.is_symlink():
        if path.suffix in WEIGHT_SUFFIXES:
            return "open_clip"
        raise ExternalModelError(
            f"{source}: unknown format (a {path.suffix or 'suffix-less'} file; open_clip "
            f"checkpoints end in {', '.join(WEIGHT_SUFFIXES)})"
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith("."):
        return "clip"  # a hub id such as openai/clip-vit-base-patch32
    raise FileNotFoundError(f"{source}: no such file or directory")


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


def _vision_classifier(clip: nn.Module) -> CLIPClassifier:
    # The head is never trained here: only the shared vision tower and projection are used.
    return CLIPClassifier(clip.vision_model, clip.visual_projection, 1)


def _load_run(path: Path, reference: LoadedCLIP):
    from attndrift.models.restore import restore_run
    from attndrift.records import evaluated_checkpoint, read_record

    record = read_record(path)
    checkpoint = evaluated_checkpoint(record)  # the weights the run's own record measured
    loaded, adapted = restore_run(path, checkpoint)
    check_architecture(reference.model.config, loaded.model.config, str(path))
    details = {
        "run_id": record.get("run_id"),
        "checkpoint": checkpoint,
        "method": record["config"].get("method"),
        "model": record["config"].get("model"),
        "dataset": (record["config"].get("data") or {}).get("dataset"),
        "classes": int(adapted.model.head.out_features),
    }
    return loaded.model, adapted.model, loaded, details


def load_finetuned(
    source: str, reference: LoadedCLIP, fmt: str = "auto", open_clip_model: str | None = None
) -> Finetuned:
    """Load FINETUNED ``source`` of format ``fmt`` (``auto``: `detect_format`) for measuring
    against ``reference``; float32, eval mode, on the CPU.

    Raises:
        FileNotFoundError: missing file; ExternalModelError: unknown format or unreadable
        checkpoint; ArchitectureMismatch: not the reference's architecture.
    """
    fmt = detect_format(source) if check_format(fmt) == "auto" else fmt
    path = Path(source)
    if fmt != "clip" and not path.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    mean, std, tokenizer = reference.mean, reference.std, reference.tokenizer
    classifier, has_head = None, False
    if fmt == "run":
        clip, classifier, own, details = _load_run(path, reference)
        has_head, mean, std, tokenizer = True, own.mean, own.std, own.tokenizer
    elif fmt == "clip":
        from attndrift.models.saved_clip import load_saved_clip

        clip, tokenizer, mean, std, details = load_saved_clip(source, reference)
    elif fmt == "peft":
        from attndrift.models.peft_adapter import load_peft

        if not path.is_dir():
            raise ExternalModelError(f"{source}: a PEFT adapter is a directory")
        clip, details = load_peft(path, reference)
    else:
        from attndrift.models.open_clip import load_open_clip

        if path.is_dir():
            raise ExternalModelError(f"{source}: an open_clip checkpoint is a file")
        clip, details = load_open_clip(regular_file(path), reference, open_clip_model)
    classifier = classifier if classifier is not None else _vision_classifier(clip)
    clip.requires_grad_(False)
    classifier.requires_grad_(False)
    classifier.eval()
    sha = checkpoint_sha256(source)
    return Finetuned(clip, classifier, has_head, tokenizer, tuple(mean), tuple(std), fmt,
                     source, sha, details)
