"""The study's classifier: vision tower -> visual projection -> linear head.

The classifier shares the vision tower and projection modules of the `CLIPModel` it was built
from, so any adaptation (LoRA layers injected in place, fine-tuned weights) is exactly what
zero-shot evaluation through `embed` sees.
"""

from __future__ import annotations

import torch
from torch import nn


class CLIPClassifier(nn.Module):
    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module,
                 num_classes: int) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.head = nn.Linear(visual_projection.out_features, num_classes)

    @classmethod
    def from_clip(cls, clip: nn.Module, num_classes: int) -> CLIPClassifier:
        return cls(clip.vision_model, clip.visual_projection, num_classes)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image embedding ``[B, D]`` (not normalised)."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return self.visual_projection(pooled)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, C]``."""
        return self.head(self.embed(pixel_values))


def trainable_state(model: nn.Module, device: torch.device | str | None = None
                    ) -> dict[str, torch.Tensor]:
    """A copy of the parameters that training changes, by name (what a checkpoint stores), on
    ``device`` (default: where each parameter is)."""
    return {n: p.detach().to(device or p.device, copy=True).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
