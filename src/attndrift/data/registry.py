"""Short-name registry of datasets. Adding one touches one file and one test row.

Names resolve, in order: built-in generated datasets registered here (the shapes world); the
real datasets of the study (`attndrift.data.hf.REAL_DATASETS`: eurosat, pets, cifar100,
cifar10, flowers102); ``hf:ID`` for any Hugging Face dataset; ``imagefolder:PATH`` for a local
folder. Classification tasks provide ``train`` and ``test``; zero-shot transfer tasks ``test``
(every real dataset is usable as either: ``data.zeroshot: [cifar100, cifar10, flowers102]``).
"""

from __future__ import annotations

from attndrift.data.base import ImageTask

# the registry itself lives in a leaf module that the built-in datasets import to register
from attndrift.data.tasks import _REGISTRY, Loader, TaskEntry, register_task

__all__ = ["Loader", "TaskEntry", "available_tasks", "known_names", "load_task", "register_task"]


def _populate() -> None:
    # Built-in datasets register themselves on import.
    import attndrift.data.shapes  # noqa: F401


def available_tasks() -> dict[str, TaskEntry]:
    _populate()
    return dict(_REGISTRY)


def known_names() -> list[str]:
    from attndrift.data.hf import REAL_DATASETS

    return sorted(available_tasks()) + sorted(REAL_DATASETS) + ["hf:ID", "imagefolder:PATH"]


def load_task(name: str, split: str = "train", seed: int = 0, *, image_size: int = 224,
              progress: bool = False) -> ImageTask:
    """Load dataset ``name`` at ``split``. ``image_size`` is the model's input size, used
    when images of mixed sizes are cached (see `attndrift.data.cache`)."""
    _populate()
    if name in _REGISTRY:
        return _REGISTRY[name].loader(split, seed)
    from attndrift.data.hf import REAL_DATASETS, load_hf, parse_hf_name

    if name in REAL_DATASETS:
        return load_hf(name, REAL_DATASETS[name], split, image_size, progress)
    if name.startswith("hf:"):
        return load_hf(name, parse_hf_name(name), split, image_size, progress)
    if name.startswith("imagefolder:"):
        from attndrift.data.imagefolder import load_imagefolder

        return load_imagefolder(name, split, image_size, progress)
    raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(known_names())}")
