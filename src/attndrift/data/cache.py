"""Decode images once into a uint8 tensor cache on disk.

Datasets whose images all share one size are cached at that native size (EuroSAT 64x64,
CIFAR 32x32) and resized on the device during training. Datasets of mixed sizes (Pets,
Flowers) are cached after CLIP's own deterministic eval transform: short side resized to the
model's input size (bicubic), center crop. Either way decoding happens once per dataset,
split and size, never per epoch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from attndrift.data.base import ImageTask
from attndrift.fileio import atomic_write_bytes

PROBE_FOR_SIZE = 16  # images looked at to decide native vs resized caching


def cache_dir() -> Path:
    """``$ATTNDRIFT_CACHE``, else ``$XDG_CACHE_HOME/attndrift``, else ``~/.cache/attndrift``."""
    if "ATTNDRIFT_CACHE" in os.environ:
        return Path(os.environ["ATTNDRIFT_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "attndrift"


def to_rgb_array(image, size: int | None, native: tuple[int, int] | None) -> np.ndarray:
    """A PIL image -> uint8 ``[3, H, W]``: kept at ``native`` (h, w), or resized+cropped to
    ``size`` x ``size``."""
    from PIL import Image

    from attndrift.data.base import rgb_image

    image = rgb_image(image)  # 16-bit, palette, alpha, CMYK: the colours shown, not clipped
    if native is not None:
        if (image.height, image.width) != native:
            image = image.resize((native[1], native[0]), Image.Resampling.BICUBIC)
    elif size is not None:
        scale = size / min(image.width, image.height)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def decode_all(images: Iterable, count: int, size: int, description: str,
               progress: bool = True) -> torch.Tensor:
    """Decode ``count`` PIL images into uint8 ``[count, 3, H, W]`` with a thread pool."""
    from rich.console import Console
    from rich.progress import Progress

    it = iter(images)
    head = [next(it) for _ in range(min(PROBE_FOR_SIZE, count))]
    sizes = {(im.height, im.width) for im in head}
    native = sizes.pop() if len(sizes) == 1 else None
    out: list[np.ndarray] = []
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool, Progress(
            console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task(f"decoding {description}", total=count)
        chunk = list(head)
        for image in it:
            chunk.append(image)
            if len(chunk) == 256:
                out += pool.map(lambda im: to_rgb_array(im, size, native), chunk)
                bar.advance(task, len(chunk))
                chunk = []
        out += pool.map(lambda im: to_rgb_array(im, size, native), chunk)
        bar.advance(task, len(chunk))
    if len(out) != count:
        raise ValueError(f"{description}: expected {count} images, decoded {len(out)}")
    return torch.from_numpy(np.stack(out))


def cached_task(key: str, build: Callable[[], ImageTask]) -> ImageTask:
    """Load ``key`` from the cache, or ``build()`` it and store it (atomically)."""
    from safetensors.torch import load_file, save

    path = cache_dir() / "datasets" / f"{key}.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        tensors = load_file(path)
        return ImageTask(meta["name"], tensors["images"], tensors["labels"],
                         json.loads(meta["class_names"]), json.loads(meta["templates"]))
    task = build()
    meta = {"name": task.name, "class_names": json.dumps(task.class_names),
            "templates": json.dumps(list(task.templates))}
    atomic_write_bytes(path, save({"images": task.images.contiguous(),
                                   "labels": task.labels.contiguous()}, metadata=meta))
    return task
