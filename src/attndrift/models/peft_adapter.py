"""A PEFT LoRA adapter directory applied to a copy of its reference CLIP, checked both ways.

An adapter is measured only when its saved tensors and the modules its config adapts agree
exactly: every saved tensor lands on a module of the reference, and every adapted module gets
all of its tensors (``lora_A`` and ``lora_B``, DoRA's magnitude). Anything else would be
measured on PEFT's initial values (``lora_B`` zero, so "no change"; or random with
``init_lora_weights: false``) and reported as a fine-tune. Checked:

- before loading: ``adapter_config.json`` is a JSON object of ``peft_type`` LORA (DoRA
  included); the weight file is a readable safetensors (or tensors-only torch) file;
- saved against expected tensor names (PEFT's own ``get_peft_model_state_dict`` of the
  injected model), then every loaded value against the saved one.

Where the adapter lives: saved tensors address ``vision_model...`` (an adapter trained on a
``CLIPVisionModel``, a ``CLIPForImageClassification`` or attndrift's classifier) or also
``text_model...`` (a ``CLIPModel``). Unless the adapter holds text-tower tensors or names
``CLIPModel`` as its base class, it is injected into the vision tower and projection only, so
target names such as ``q_proj`` do not also wrap the text tower with untrained layers.
``modules_to_save`` entries the reference lacks (a classification head, ``classifier``) are
left out knowingly: their tensors are counted in the details, never scored.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attndrift.models.clip import LoadedCLIP
from attndrift.models.errors import ArchitectureMismatch, ExternalModelError
from attndrift.models.weights import read_json_object, read_state_dict, regular_file

SUPPORTED = ("LORA",)
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
RESAVE = "save it again with peft_model.save_pretrained after training"


class _VisionPart(nn.Module):
    """The vision tower and projection of a CLIPModel under the names every vision-only
    adapter addresses (``vision_model...``); LoRA injected here lands in the CLIPModel."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection


def read_adapter_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` of adapter directory ``path``, checked to be a LoRA adapter."""
    config = read_json_object(path / "adapter_config.json")
    kind = config.get("peft_type")
    if kind not in SUPPORTED:
        raise ExternalModelError(
            f"{path}: peft_type {kind!r} is not supported; measure reads LoRA adapters "
            "(peft_type LORA, DoRA included): merge another adapter into its model "
            "(merge_and_unload), save_pretrained that model and measure the directory"
        )
    return config


def _peft_config(path: Path) -> Any:
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(path))
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ExternalModelError(
            f"{path}/adapter_config.json: not a valid LoRA config "
            f"({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})"
        ) from None
    config.inference_mode = True
    return config


def _module_of(key: str) -> str:
    """The module a saved adapter tensor belongs to (``...q_proj.lora_A.weight`` ->
    ``...q_proj``)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_"):
            return ".".join(parts[:i])
    return key.rsplit(".", 1)[0]


def _split_head(config: Any, base: nn.Module, saved: dict[str, torch.Tensor]):
    """``modules_to_save`` entries ``base`` lacks (a task head), removed from ``config``, and
    the saved tensors that belong to them."""
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()} | {
        n for n, _ in base.named_modules()
    }
    wanted = list(config.modules_to_save or [])
    absent = [m for m in wanted if m not in names]
    config.modules_to_save = [m for m in wanted if m in names] or None
    head = sorted(k for k in saved if any(f".{m}." in f".{k}" for m in absent))
    return absent, head


def _check_coverage(path: Path, saved: dict, expected: dict, weights: Path) -> None:
    """Every saved tensor has a module, every adapted module has all its tensors."""
    stray = sorted(set(saved) - set(expected))
    if stray:
        raise ArchitectureMismatch(
            f"{path}: {len(stray)} adapter tensors address modules the reference does not "
            f"have, e.g. {stray[0]}; give the --reference the adapter was trained on"
        )
    missing = sorted(set(expected) - set(saved))
    if missing:
        modules = {_module_of(k) for k in missing}
        what = "holds no tensors" if not saved else f"lacks {len(missing)} of its tensors"
        raise ExternalModelError(
            f"{path}: {weights.name} {what} (e.g. {missing[0]}; {len(modules)} adapted "
            f"modules incomplete): they would be measured at PEFT's initial values, not as "
            f"trained; {RESAVE}"
        )
    for key, value in saved.items():
        if expected[key].shape != value.shape:
            raise ArchitectureMismatch(
                f"{path}: {key} has shape {tuple(value.shape)}, the reference's module "
                f"{tuple(expected[key].shape)}"
            )


def _base_warning(config: dict[str, Any], reference: LoadedCLIP) -> list[str]:
    """A warning when the adapter names a base model other than the reference."""
    base = config.get("base_model_name_or_path")
    if not base:
        return []
    same = base == reference.source or (
        Path(base).exists()
        and Path(reference.source).exists()
        and Path(base).resolve() == Path(reference.source).resolve()
    )
    if same:
        return []
    return [
        f"the adapter names base model {base!r}, measured against reference "
        f"{reference.source!r}: check that --reference is the model it was trained on"
    ]


def load_peft(path: Path, reference: LoadedCLIP) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of the reference CLIPModel with the LoRA adapter in ``path`` injected (unmerged),
    and details (``warnings`` among them). See the module docstring for what is checked."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    raw = read_adapter_config(path)
    weights = next((path / n for n in WEIGHT_FILES if (path / n).exists()), None)
    if weights is None:
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors (or .bin)")
    saved = read_state_dict(regular_file(weights))
    config = _peft_config(path)
    clip = copy.deepcopy(reference.model)
    base_class = (raw.get("auto_mapping") or {}).get("base_model_class")
    whole = base_class == "CLIPModel" or any(".text_model." in f".{k}" for k in saved)
    base = clip if whole else _VisionPart(clip)
    absent, head = _split_head(config, base, saved)
    saved = {k: v for k, v in saved.items() if k not in set(head)}
    try:
        wrapped = PeftModel(base, config)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise ArchitectureMismatch(
            f"{path} does not fit the reference: {str(err).splitlines()[0][:300]}"
        ) from None
    expected = get_peft_model_state_dict(wrapped, save_embedding_layers=False)
    _check_coverage(path, saved, expected, weights)
    set_peft_model_state_dict(wrapped, saved)
    landed = get_peft_model_state_dict(wrapped, save_embedding_layers=False)
    wrong = [k for k, v in saved.items() if not torch.equal(landed[k], v.to(landed[k].dtype))]
    if wrong:
        raise ExternalModelError(f"{path}: {len(wrong)} adapter tensors did not load, e.g. "
                                 f"{wrong[0]}")
    clip.eval()
    return clip, {
        "peft_type": raw.get("peft_type"),
        "r": raw.get("r"),
        "target_modules": raw.get("target_modules"),
        "use_dora": bool(raw.get("use_dora")),
        "base_model": raw.get("base_model_name_or_path"),
        "adapted_towers": "vision and text" if whole else "vision",
        "adapter_tensors": len(saved),
        "ignored": {"modules_to_save": absent, "tensors": len(head)} if absent else None,
        "warnings": _base_warning(raw, reference),
    }
