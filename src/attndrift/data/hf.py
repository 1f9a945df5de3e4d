"""Hugging Face datasets: registered real datasets and any ``hf:ID`` dataset.

A source is looked up, in order: a local directory written by ``save_to_disk`` (given as the
id itself, or found as ``<data root>/<id>`` where the data root is ``$ATTNDRIFT_DATA_ROOT``, a
mirror for offline clusters), then the hub through `datasets.load_dataset` (which respects
``HF_HOME``, ``HF_DATASETS_CACHE`` and ``HF_DATASETS_OFFLINE``). Decoded images go through the
uint8 cache, keyed by the dataset's own content fingerprint.

``hf:ID[@REVISION][?image=COL&label=COL&train=SPLIT&test=SPLIT]`` names any dataset.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

import torch

from attndrift.data.base import ImageTask
from attndrift.data.cache import cached_task, decode_all
from attndrift.data.names import EUROSAT, FLOWERS102, TEMPLATES, prompt_names


class DatasetUnavailable(RuntimeError):
    """A dataset that is neither local nor downloadable here."""


@dataclass(frozen=True)
class HFSource:
    id: str
    image: str = "image"
    label: str = "label"
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    revision: str | None = None
    rename: dict[str, str] | None = None
    canonical: tuple[str, ...] | None = None
    templates: tuple[str, ...] = TEMPLATES["generic"]


def parse_hf_name(spec: str) -> HFSource:
    """``hf:ID[@REV][?image=..&label=..&train=..&test=..]`` -> `HFSource`."""
    body = spec.removeprefix("hf:")
    body, _, query = body.partition("?")
    ident, _, revision = body.partition("@")
    opts = dict(parse_qsl(query))
    unknown = set(opts) - {"image", "label", "train", "test"}
    if not ident or unknown:
        raise ValueError(f"bad dataset name {spec!r}: use hf:ID[@REVISION][?image=COL&label=COL"
                         f"&train=SPLIT&test=SPLIT]" + (f" (unknown {sorted(unknown)})"
                                                         if unknown else ""))
    return HFSource(ident, image=opts.get("image", "image"), label=opts.get("label", "label"),
                    splits={"train": opts.get("train", "train"), "test": opts.get("test", "test")},
                    revision=revision or None)


def _local_path(ident: str) -> Path | None:
    candidates = [Path(ident).expanduser()]
    root = os.environ.get("ATTNDRIFT_DATA_ROOT")
    if root:
        candidates.append(Path(root).expanduser() / ident)
    return next((p for p in candidates if (p / "dataset_dict.json").is_file()
                 or (p / "dataset_info.json").is_file()), None)


def _hub_dataset_cached(ident: str) -> bool:
    """Whether a download of hub dataset ``ident`` is cached: its files in the hub cache, or
    its prepared Arrow files in the datasets cache (``org___name``)."""
    from attndrift import hub

    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME")
                                                  or "~/.cache").expanduser() / "huggingface")
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets").expanduser()
    return ((hub.hub_cache() / f"datasets--{ident.replace('/', '--')}" / "snapshots").is_dir()
            or (datasets_cache / ident.replace("/", "___")).is_dir())


def hub_dataset_problem(source: HFSource) -> str | None:
    """One line saying why ``source`` cannot be read here, or None if it may be: a local
    copy, a cached download, or the hub answering one probe (`attndrift.hub`). For validation:
    a dataset that is plainly absent stops a run before anything is recorded."""
    from attndrift import hub

    if _local_path(source.id) is not None or _hub_dataset_cached(source.id):
        return None
    fix = (f"download it once with network access (cache: {hub.hub_cache()}; HF_HOME moves "
           f"it), or save it with `save_to_disk` to $ATTNDRIFT_DATA_ROOT/{source.id} or any "
           f"directory and use hf:/that/dir")
    if hub.offline("dataset"):
        return (f"dataset {source.id!r} is not cached, not under $ATTNDRIFT_DATA_ROOT, and "
                f"offline mode forbids downloading it: {fix}")
    found = hub.probe(source.id, "dataset", "README.md")
    if found is None:
        return None
    kind, why = found
    if kind == "missing":
        return f"dataset {source.id!r} does not exist on {hub.endpoint()} (check the id)"
    if kind == "gated":
        return (f"dataset {source.id!r} is gated on {hub.endpoint()}: accept its terms there "
                f"and log in (`hf auth login`), or {fix.split(', or ')[1]}")
    return (f"dataset {source.id!r} is not cached and {hub.endpoint()} is unreachable ({why}, "
            f"one try, {hub.probe_timeout():g}s timeout): {fix}")


def _open_split(source: HFSource, split: str):
    try:
        import datasets
    except ImportError:
        raise DatasetUnavailable("reading Hugging Face datasets needs the `datasets` package: "
                                 "pip install -e '.[datasets]' in attndrift's checkout") from None
    if split not in source.splits:
        raise ValueError(f"{source.id}: split {split!r} not known (have {sorted(source.splits)})")
    name = source.splits[split]
    local = _local_path(source.id)
    if local is not None:
        data = datasets.load_from_disk(str(local))
        if isinstance(data, datasets.DatasetDict):
            if name not in data:
                raise ValueError(f"{local}: no split {name!r} (has {sorted(data)})")
            data = data[name]
        return data, f"local:{local}"
    try:
        data = datasets.load_dataset(source.id, split=name, revision=source.revision)
    except Exception as err:  # offline, missing, gated: all end the same way for the user
        where = os.environ.get("HF_DATASETS_CACHE") or os.environ.get("HF_HOME") or \
            "~/.cache/huggingface"
        raise DatasetUnavailable(
            f"dataset {source.id!r} (split {name!r}) is not available: {type(err).__name__}. "
            f"Download it once with network access (cache: {where}), or save it with "
            f"`save_to_disk` to $ATTNDRIFT_DATA_ROOT/{source.id} or any directory and use "
            f"hf:/that/dir") from None
    return data, f"hub:{source.id}@{source.revision or 'default'}"


def load_hf(name: str, source: HFSource, split: str, image_size: int = 224,
            progress: bool = True) -> ImageTask:
    """Decode (once, then cached) split ``split`` of ``source`` into an `ImageTask`."""
    data, origin = _open_split(source, split)
    for column in (source.image, source.label):
        if column not in data.column_names:
            raise ValueError(f"{source.id}: no column {column!r} (columns: {data.column_names}); "
                             f"name them with hf:{source.id}?image=COL&label=COL")
    feature = data.features[source.label]
    raw = list(getattr(feature, "names", None) or [])
    if not raw:
        raise ValueError(f"{source.id}: label column {source.label!r} has no class names "
                         "(a ClassLabel feature is required)")
    class_names = prompt_names(raw, rename=source.rename, canonical=source.canonical,
                               source=source.id)
    fingerprint = getattr(data, "_fingerprint", None) or origin
    key = hashlib.sha256(f"{origin}|{fingerprint}|{split}|{image_size}|{source.image}|"
                         f"{source.label}".encode()).hexdigest()[:20]

    def build() -> ImageTask:
        images = decode_all((row[source.image] for row in data), len(data), image_size,
                            f"{name}/{split}", progress)
        labels = torch.tensor(data[source.label], dtype=torch.long)
        return ImageTask(name, images, labels, class_names, list(source.templates))

    task = cached_task(f"{name.replace('/', '_').replace(':', '_')}-{split}-{key}", build)
    return ImageTask(name, task.images, task.labels, class_names, list(source.templates), raw)


REAL_DATASETS: dict[str, HFSource] = {
    "eurosat": HFSource("tanganke/eurosat", rename=EUROSAT, templates=TEMPLATES["eurosat"]),
    "pets": HFSource("timm/oxford-iiit-pet", templates=TEMPLATES["pets"]),
    "cifar100": HFSource("uoft-cs/cifar100", image="img", label="fine_label",
                         templates=TEMPLATES["cifar100"]),
    "cifar10": HFSource("uoft-cs/cifar10", image="img", label="label",
                        templates=TEMPLATES["cifar10"]),
    # Copies of Flowers102 name classes in words or by number; numbers map to the official names.
    "flowers102": HFSource("nelorth/oxford-flowers", canonical=FLOWERS102,
                           templates=TEMPLATES["flowers102"]),
}
