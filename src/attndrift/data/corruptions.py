"""ImageNet-C-style corruptions of uint8 images, seeded and identical across runs.

Definitions and severity parameters are those of Hendrycks & Dietterich (2019, "Benchmarking
neural network robustness to common corruptions and perturbations", ImageNet-C), reimplemented
in torch (no scikit-image, OpenCV or ImageMagick here). The parameters are ImageNet-C's, set for
224-pixel images and applied at the resolution a dataset is cached at, so the blurs are
relatively stronger on 32- or 64-pixel images. Approximations, listed in docs/fidelity.md:
motion blur is ImageMagick's one-sided Gaussian streak rounded to whole-pixel shifts; pixelate
is an area downsample and a nearest-neighbour upsample. ImageNet-C's snow, frost, fog, glass,
zoom, elastic and spatter are not implemented (datasets that publish corrupted splits, like
EuroSAT's, are read through ``data.robustness.splits`` instead).

Every function maps uint8 ``[N, 3, H, W]`` to uint8 ``[N, 3, H, W]``; random draws come from
one CPU generator seeded by `corrupt` from the seed, the corruption and its severity, and
images are processed in fixed chunks, so the output depends on nothing else.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

CHUNK = 128  # images per step; fixed, so the random draws never depend on memory

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]  # float 0..1 in/out


def _gaussian_noise(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[s - 1]
    return x + c * torch.randn(x.shape, generator=g)


def _shot_noise(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    c = (60.0, 25.0, 12.0, 5.0, 3.0)[s - 1]
    return torch.poisson(x * c, generator=g) / c


def _impulse_noise(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    # salt and pepper on a share c of the values (each channel apart), half of each
    c = (0.03, 0.06, 0.09, 0.17, 0.27)[s - 1]
    hit = torch.rand(x.shape, generator=g) < c
    salt = (torch.rand(x.shape, generator=g) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)


def _speckle_noise(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    c = (0.15, 0.2, 0.35, 0.45, 0.6)[s - 1]
    return x + x * c * torch.randn(x.shape, generator=g)


def _filter(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Each channel convolved with ``kernel`` ``[kh, kw]`` (odd sizes), same size out."""
    kh, kw = kernel.shape
    n, ch, h, w = x.shape
    if mode == "reflect" and (kh // 2 >= h or kw // 2 >= w):
        mode = "replicate"  # reflection needs a border narrower than the image
    y = F.pad(x.reshape(n * ch, 1, h, w), (kw // 2, kw // 2, kh // 2, kh // 2), mode=mode)
    return F.conv2d(y, kernel.flip(0, 1)[None, None].to(x.dtype)).reshape(n, ch, h, w)


def _gauss1d(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(t * t) / (2 * sigma * sigma))
    return k / k.sum()


def _gaussian_blur(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    sigma = (1.0, 2.0, 3.0, 4.0, 6.0)[s - 1]
    k = _gauss1d(sigma, math.ceil(4 * sigma))  # scikit-image's truncation at 4 sigma
    return _filter(x, torch.outer(k, k).float(), "replicate")  # its "nearest" border


def _defocus_blur(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    radius, alias = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[s - 1]
    half = max(8, radius)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).double()
    disk /= disk.sum()
    a = _gauss1d(alias, 1 if radius <= 8 else 2)  # OpenCV's 3x3 / 5x5 anti-aliasing blur
    disk = _filter(disk[None, None].expand(1, 1, -1, -1).clone(), torch.outer(a, a),
                   "reflect")[0, 0]
    return _filter(x, disk.float(), "reflect")


def _motion_blur(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    # ImageMagick's motion blur: a one-sided streak of 2r+1 taps at distances 0..2r along a
    # random angle in [-45, 45) degrees per image, Gaussian weights in the distance
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[s - 1]
    d = torch.arange(2 * radius + 1, dtype=torch.float64)
    weight = torch.exp(-(d * d) / (2 * sigma * sigma))
    weight /= weight.sum()
    angles = torch.deg2rad(torch.rand(x.shape[0], generator=g, dtype=torch.float64) * 90 - 45)
    out = torch.empty_like(x)
    n, ch, h, w = x.shape
    for i in range(n):
        dx = torch.round(d * torch.cos(angles[i])).long().tolist()
        dy = torch.round(d * torch.sin(angles[i])).long().tolist()
        pad = 2 * radius
        padded = F.pad(x[i : i + 1], (pad, pad, pad, pad), mode="replicate")[0]
        acc = torch.zeros((ch, h, w), dtype=torch.float64)
        for wt, ox, oy in zip(weight.tolist(), dx, dy, strict=True):
            acc += wt * padded[:, pad + oy : pad + oy + h, pad + ox : pad + ox + w]
        out[i] = acc.to(x.dtype)
    return out


def _contrast(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[s - 1]
    means = x.mean(dim=(2, 3), keepdim=True)  # per image and channel
    return (x - means) * c + means


def _brightness(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    # HSV value + c (hue and saturation kept): rgb scales by V'/V; black turns grey V'
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[s - 1]
    v = x.amax(dim=1, keepdim=True)
    v2 = (v + c).clamp(0.0, 1.0)
    return torch.where(v > 0, x * v2 / v.clamp_min(1e-12), v2.expand_as(x))


def _saturate(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    # HSV saturation S' = clip(S a + b): each channel is V (1 - S f) with f fixed by the hue
    a, b = ((0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.1))[s - 1]
    v = x.amax(dim=1, keepdim=True)
    sat = torch.where(v > 0, (v - x.amin(dim=1, keepdim=True)) / v.clamp_min(1e-12),
                      torch.zeros_like(v))
    s2 = (sat * a + b).clamp(0.0, 1.0)
    coloured = v - (v - x) * s2 / sat.clamp_min(1e-12)
    # grey pixels have hue 0 (red) in scikit-image's conversion: (V, V(1-S'), V(1-S'))
    grey = torch.cat([v, v * (1 - s2), v * (1 - s2)], dim=1)
    return torch.where(sat > 0, coloured, grey)


def _pixelate(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def _jpeg_compression(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    from PIL import Image

    quality = (25, 18, 15, 10, 7)[s - 1]
    out = torch.empty_like(x)
    pixels = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, im in enumerate(pixels):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        decoded = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
        out[i] = torch.from_numpy(decoded).permute(2, 0, 1)
    return out


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise, "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur, "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur, "contrast": _contrast, "brightness": _brightness,
    "saturate": _saturate, "pixelate": _pixelate, "jpeg_compression": _jpeg_compression,
}


def corruption_seed(name: str, severity: int, seed: int) -> int:
    """A 63-bit seed of (corruption, severity, seed), stable across processes and machines."""
    digest = hashlib.sha256(f"attndrift-corruption/{name}/{severity}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> the same images under corruption ``name`` at ``severity``
    (1-5), rounded back to uint8. Deterministic in (images, name, severity, seed)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in range(1, 6):
        raise ValueError(f"severity must be 1..5, got {severity}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 [N, 3, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    g = torch.Generator().manual_seed(corruption_seed(name, severity, seed))
    out = torch.empty_like(images)
    fn = CORRUPTIONS[name]
    for start in range(0, images.shape[0], CHUNK):
        x = images[start : start + CHUNK].float() / 255.0
        y = fn(x, severity, g)
        out[start : start + CHUNK] = (y.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return out
