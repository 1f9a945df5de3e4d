"""Local image folders: ``imagefolder:PATH`` with ``PATH/<split>/<class name>/<image>``.

Class names are the folder names (humanised: ``golden_retriever`` -> ``golden retriever``),
in sorted order. Decoded images go through the uint8 cache, keyed by the file list, sizes and
modification times, so an edited folder is decoded again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from attndrift.data.base import ImageTask
from attndrift.data.cache import cached_task, decode_all
from attndrift.data.names import TEMPLATES, prompt_names

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_imagefolder(name: str, split: str, image_size: int = 224,
                     progress: bool = True) -> ImageTask:
    root = Path(name.removeprefix("imagefolder:")).expanduser()
    split_dir = root / split
    if not split_dir.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"image folder {root} has no {split}/ directory (found: "
                                f"{have or 'nothing'}); expected {root}/{split}/<class>/<image>")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{split_dir} has no class sub-directories")
    files, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((split_dir / cls).iterdir()):
            if f.suffix.lower() in EXTENSIONS:
                files.append(f)
                labels.append(label)
    if not files:
        raise FileNotFoundError(f"{split_dir} holds no images ({', '.join(sorted(EXTENSIONS))})")
    class_names = prompt_names(classes, source=str(root))
    h = hashlib.sha256(f"{root.resolve()}|{split}|{image_size}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(split_dir)}|{st.st_size}|{st.st_mtime_ns}".encode())

    def build() -> ImageTask:
        from PIL import Image

        images = decode_all((Image.open(f) for f in files), len(files), image_size,
                            f"{root.name}/{split}", progress)
        return ImageTask(name, images, torch.tensor(labels), class_names,
                         list(TEMPLATES["generic"]))

    return cached_task(f"imagefolder-{root.name}-{split}-{h.hexdigest()[:20]}", build)
