"""Local image folders: ``imagefolder:PATH`` with ``PATH/<split>/<class name>/<image>``.

Class names are the folder names (humanised: ``golden_retriever`` -> ``golden retriever``),
in sorted order. Every split must hold the same class folders (labels are positions in that
sorted list, so a class missing from one split would shift every label after it), at least two
of them, each with at least one image; `check_imagefolder` checks this for every split a run
reads when its config is validated, before anything is decoded. Images of any PIL mode are
decoded to the RGB they show (`attndrift.data.base.rgb_image`: 16-bit, palette, grayscale,
alpha, CMYK); a file that does not decode stops the load with one line naming it, or, with
``imagefolder:PATH?skip_bad_images=true``, is left out with one line counting what was left
out (the option is part of the dataset's name, so of the run's id). Decoded images go through
the uint8 cache, keyed by the file list, sizes and modification times, so an edited folder is
decoded again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from attndrift.data.base import ImageTask
from attndrift.data.cache import cached_task, decode_all
from attndrift.data.names import TEMPLATES, prompt_names

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageFolderError(ValueError):
    """A folder that cannot be read as labelled images; ``str()`` is one line."""


def _parse(name: str) -> tuple[Path, bool]:
    """``imagefolder:PATH[?skip_bad_images=true|false]`` -> (root, skip_bad_images)."""
    body = name.removeprefix("imagefolder:")
    path, sep, query = body.rpartition("?") if "?" in body else (body, "", "")
    skip = False
    if sep:
        key, _, value = query.partition("=")
        if key != "skip_bad_images" or value.lower() not in ("true", "false", "1", "0"):
            raise ImageFolderError(f"bad dataset name {name!r}: use imagefolder:PATH or "
                                   "imagefolder:PATH?skip_bad_images=true")
        skip = value.lower() in ("true", "1")
    return Path(path).expanduser(), skip


def _root(name: str) -> Path:
    return _parse(name)[0]


def _scan(root: Path, split: str) -> tuple[list[str], list[Path], list[int]]:
    """Class folders (sorted), image files and labels of one split, without decoding."""
    split_dir = root / split
    if not split_dir.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"image folder {root} has no {split}/ directory (found: "
                                f"{have or 'nothing'}); expected {root}/{split}/<class>/<image>")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ImageFolderError(f"{split_dir} has {len(classes)} class sub-directories "
                               f"({', '.join(classes) or 'none'}); classification needs >= 2")
    files, labels, empty = [], [], []
    for label, cls in enumerate(classes):
        found = [f for f in sorted((split_dir / cls).iterdir())
                 if f.suffix.lower() in EXTENSIONS and f.is_file()]
        if not found:
            empty.append(cls)
        files += found
        labels += [label] * len(found)
    if empty:
        raise ImageFolderError(f"{split_dir}: class folder(s) {', '.join(empty)} hold no images "
                               f"({', '.join(sorted(EXTENSIONS))})")
    return classes, files, labels


def _same_classes(root: Path, split: str, classes: list[str]) -> None:
    """Raise unless ``split`` has the class folders of ``train`` (when there is a train/)."""
    if split == "train" or not (root / "train").is_dir():
        return
    train = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if classes != train:
        only_here = sorted(set(classes) - set(train))
        only_train = sorted(set(train) - set(classes))
        raise ImageFolderError(
            f"{root}: {split}/ and train/ hold different classes (only in {split}/: "
            f"{', '.join(only_here) or '-'}; only in train/: {', '.join(only_train) or '-'}); "
            "labels would not line up: give both splits the same class folders")


def check_imagefolder(name: str, splits: tuple[str, ...] = ("train", "test")) -> None:
    """Check ``imagefolder:PATH`` for the ``splits`` a run reads, without decoding: each
    exists, has >= 2 class folders, each with images, the same classes as ``train``."""
    root = _root(name)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    for split in splits:
        classes, _, _ = _scan(root, split)
        _same_classes(root, split, classes)


def _open(path: Path):
    """Open and decode one image (PIL), or raise one line naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, with its name known
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        why = str(err).replace(str(path), "").strip(" '\"") or type(err).__name__
        raise ImageFolderError(f"{path}: not a readable image ({why})") from None
    return image


def _readable(files: list[Path], labels: list[int], split_dir: Path):
    """The files (and their labels) that decode; one line on stderr counting the others."""
    import sys

    good, bad = [], []
    for f, label in zip(files, labels, strict=True):
        try:
            _open(f).close()
            good.append((f, label))
        except ImageFolderError as err:
            bad.append(str(err))
    if bad:
        print(f"warning: skipped {len(bad)} of {len(files)} images of {split_dir} that do not "
              f"decode (skip_bad_images=true; first: {bad[0]})", file=sys.stderr, flush=True)
    if not good or len({label for _, label in good}) < len(set(labels)):
        raise ImageFolderError(f"{split_dir}: after skipping {len(bad)} unreadable images a "
                               "class has none left")
    return [f for f, _ in good], [label for _, label in good]


def load_imagefolder(name: str, split: str, image_size: int = 224,
                     progress: bool = True) -> ImageTask:
    root, skip_bad = _parse(name)
    classes, files, labels = _scan(root, split)
    _same_classes(root, split, classes)
    class_names = prompt_names(classes, source=str(root))
    split_dir = root / split
    # "rgb2": the decoding of 16-bit/alpha/CMYK images changed; never reuse older caches
    h = hashlib.sha256(f"{root.resolve()}|{split}|{image_size}|rgb2|{skip_bad}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(split_dir)}|{st.st_size}|{st.st_mtime_ns}".encode())

    def build() -> ImageTask:
        kept, kept_labels = _readable(files, labels, split_dir) if skip_bad else (files, labels)
        images = decode_all((_open(f) for f in kept), len(kept), image_size,
                            f"{root.name}/{split}", progress)
        return ImageTask(name, images, torch.tensor(kept_labels), class_names,
                         list(TEMPLATES["generic"]))

    task = cached_task(f"imagefolder-{root.name}-{split}-{h.hexdigest()[:20]}", build)
    return ImageTask(task.name, task.images, task.labels, task.class_names, task.templates,
                     list(classes))
