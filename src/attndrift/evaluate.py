"""Evaluation passes used by the training loop: attention probes, accuracy, zero-shot."""

from __future__ import annotations

import contextlib

import torch

from attndrift.data.base import ImageTask, Preprocessor
from attndrift.models.classifier import CLIPClassifier
from attndrift.probes.capture import cls_patch_attention
from attndrift.zeroshot import zeroshot_accuracy


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for, or on CUDA under ``auto``; otherwise a no-op."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def probe_attention(model: CLIPClassifier, images: torch.Tensor, preprocess: Preprocessor,
                    device: torch.device, batch_size: int) -> torch.Tensor:
    """CLS->patch attention ``[n, L, H, N]`` (float32, CPU) of uint8 ``images`` under ``model``."""
    parts = []
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            x = preprocess(images[start : start + batch_size].to(device, non_blocking=True))
            parts.append(cls_patch_attention(model.vision_model, x).float().cpu())
    return torch.cat(parts)


@torch.no_grad()
def accuracy(model: CLIPClassifier, task: ImageTask, preprocess: Preprocessor,
             device: torch.device, batch_size: int, precision: str = "fp32") -> float:
    correct = torch.zeros((), dtype=torch.long, device=device)
    with eval_mode(model):
        for start in range(0, len(task), batch_size):
            x = preprocess(task.images[start : start + batch_size].to(device, non_blocking=True))
            with autocast(device, precision):
                pred = model(x).argmax(dim=-1)
            correct += (pred == task.labels[start : start + batch_size].to(device)).sum()
    return float(correct) / max(1, len(task))


def zeroshot_all(model: CLIPClassifier, weights: dict[str, torch.Tensor],
                 tasks: dict[str, ImageTask], preprocess: Preprocessor, device: torch.device,
                 batch_size: int) -> dict[str, float]:
    """Zero-shot accuracy on every task through the classifier's (adapted) image encoder."""
    with eval_mode(model):
        return {name: zeroshot_accuracy(model.embed, weights[name], task, preprocess, device,
                                        batch_size) for name, task in tasks.items()}
