"""The in-memory form of every dataset, and device-side preprocessing.

Images are kept as uint8 tensors ``[N, 3, H, W]`` at native resolution; resizing, normalising
and flipping happen on the device in batches (`Preprocessor`), so decoding never limits a run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# PIL modes holding more than 8 bits per sample: PIL's own convert("RGB") clips them at 255
# (a 16-bit image turns all white), so they are scaled to 8 bits here.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def rgb_image(image):
    """A PIL image of any mode -> an 8-bit RGB PIL image with the colours it shows.

    16-bit grayscale (``I;16*``, and ``I`` as 16-bit PNGs open) is scaled by 255/65535;
    transparency (``RGBA``, ``LA``, ``PA``, palette with a transparent entry) is composited
    over white, as viewers show it; palette, grayscale, 1-bit and CMYK go through PIL's
    conversion."""
    from PIL import Image

    if image.mode in WIDE_MODES:
        wide = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.rint(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":  # float samples: taken as 0..1
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64) * 255.0), 0, 255)
        return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTask:
    """A labelled image set: ``images`` uint8 ``[N, 3, H, W]``, ``labels`` int64 ``[N]``."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    # the label names as the dataset stores them (``aquarium_fish``), when they differ from
    # the prompt names; None: the same
    raw_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be uint8 [N, 3, H, W], got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: {self.images.shape[0]} images but labels of shape "
                             f"{tuple(self.labels.shape)}")
        if len(self.labels) and int(self.labels.max()) >= len(self.class_names):
            raise ValueError(f"{self.name}: label {int(self.labels.max())} has no class name "
                             f"({len(self.class_names)} names)")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: torch.Tensor, name: str | None = None) -> ImageTask:
        return ImageTask(name or self.name, self.images[index], self.labels[index],
                         self.class_names, self.templates, self.raw_names)

    def fingerprint(self) -> str:
        """Content hash of images, labels and class names (16 hex digits)."""
        h = hashlib.sha256()
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.contiguous().numpy().tobytes())
        h.update("\x1f".join(self.class_names).encode())
        return h.hexdigest()[:16]


class Preprocessor:
    """uint8 ``[B, 3, H, W]`` -> normalised float32 ``[B, 3, S, S]`` on the batch's device.

    CLIP's recipe: resize the short side to ``size`` (bicubic, antialiased), center-crop,
    normalise with the model's own mean and std; optional random horizontal flip for training.

    As in CLIP's own PIL pipeline, a uint8 batch is resized to uint8 pixels: on the CPU by
    torch's uint8 kernel (channels-last, within one level of PIL's bicubic resize and ~15x
    faster than resizing floats), on other devices in float32 then rounded to whole levels.
    Other dtypes are taken as 0..255 values and resized in float32 without rounding. Nothing
    here reads a device tensor back to the host, so it is safe inside a step loop.
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # ((x / 255) - mean) / std = x * scale + offset, kept per device (no copy per batch)
        self._affine: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def draw_flips(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Which of ``n`` images to flip (bool ``[n]``, on the CPU generator)."""
        return torch.rand(n, generator=generator, device="cpu") < 0.5

    def _affine_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._affine:
            scale = 1.0 / (255.0 * self.std)
            self._affine[device] = (scale.to(device), (-self.mean / self.std).to(device))
        return self._affine[device]

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if x.dtype == torch.uint8 and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # the vectorised uint8 path
            return F.interpolate(x, size=size, mode="bicubic", align_corners=False,
                                 antialias=True)
        y = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False,
                          antialias=True)
        if x.dtype == torch.uint8:
            y.round_()  # whole pixel levels, as the uint8 path and PIL produce
        return y.clamp_(0.0, 255.0)

    def __call__(self, images: torch.Tensor, *, flip: bool = False,
                 generator: torch.Generator | None = None,
                 flip_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = images
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            scale = self.size / min(h, w)
            nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            if (nh, nw) != (h, w):
                x = self._resize(x, (nh, nw))
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            x = x[..., top : top + self.size, left : left + self.size]
        scale, offset = self._affine_on(x.device)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        out.copy_(x).mul_(scale).add_(offset)  # always a new tensor, never the caller's
        if flip or flip_mask is not None:
            mask = flip_mask if flip_mask is not None else self.draw_flips(x.shape[0], generator)
            if mask.device.type == "cpu" and out.device.type == "cpu":
                for i in mask.nonzero().flatten().tolist():  # only the flipped images
                    out[i] = out[i].flip(-1)
            else:
                # non_blocking: a blocking host-to-device copy would synchronise the step loop
                mask = mask.to(out.device, non_blocking=True).view(-1, 1, 1, 1)
                out = torch.where(mask, out.flip(-1), out)
        return out
