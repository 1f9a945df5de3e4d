"""Rebuild a finished run's model from its record and a checkpoint (safetensors only)."""

from __future__ import annotations

from pathlib import Path

import torch

from attndrift.config import validate
from attndrift.models.adapt import Adapted, adapt, method_kwargs
from attndrift.models.classifier import CLIPClassifier
from attndrift.models.clip import LoadedCLIP, load_clip
from attndrift.records import read_record


def restore_run(run_dir: str | Path, which: str = "final",
                device: str | torch.device = "cpu") -> tuple[LoadedCLIP, Adapted]:
    """The pretrained CLIP of run ``run_dir`` with the checkpoint ``which`` (final|best) loaded
    into its classifier; the classifier shares that CLIP's vision tower. Eval mode."""
    from attndrift.models.weights import read_safetensors

    run_dir = Path(run_dir)
    record = read_record(run_dir)
    cfg = validate(record["config"], str(run_dir))
    path = run_dir / f"{which}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (was the run saved with save_checkpoints?)")
    loaded = load_clip(cfg.model)
    state = read_safetensors(path, device=str(device))  # a truncated file: one line
    num_classes = state["head.weight"].shape[0]
    model = CLIPClassifier.from_clip(loaded.model, num_classes)
    adapted = adapt(model, cfg.method,
                    **method_kwargs(cfg.method, cfg.model_dump()))
    # The checkpoint holds exactly the trainable tensors; anything else would be a mismatch.
    expected = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise ValueError(f"{path} does not match run config: "
                         f"{len(set(state) ^ expected)} tensors differ")
    adapted.model.load_state_dict(state, strict=False)
    adapted.model.to(device).eval()
    loaded.model.to(device)
    return loaded, adapted
