"""Corrupted test splits for robustness scores (`data.robustness`).

Two sources, scored the same way: corrupted test splits a dataset publishes (EuroSAT's seven,
pre-generated with tanganke/eurosat: the later protocol's), read through the dataset's own
loading path; and ImageNet-C-style corruptions generated from the clean test split
(`attndrift.data.corruptions`), for any dataset. Each split is scored on a class-balanced
subset of ``images`` (the later protocol: 1,000), the same for every run; the record holds the
accuracy per split, their mean and the gap to clean test accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from attndrift.data.base import ImageTask
from attndrift.data.corruptions import corrupt
from attndrift.data.splits import balanced_subset

# corrupted test splits published with a registered dataset
PUBLISHED = {
    "eurosat": ("contrast", "gaussian_noise", "impulse_noise", "jpeg_compression",
                "motion_blur", "pixelate", "spatter"),
}


def check_named_splits(dataset: str, splits: list[str]) -> None:
    """Raise `ValueError` (one line) unless ``dataset`` can have the corrupted ``splits``:
    a registered dataset only those it publishes; ``hf:`` datasets any (read at load); an
    image folder those it has as folders."""
    from attndrift.data.hf import REAL_DATASETS

    if dataset in REAL_DATASETS or not dataset.startswith(("hf:", "imagefolder:")):
        have = PUBLISHED.get(dataset, ())
        missing = [s for s in splits if s not in have]
        if missing:
            raise ValueError(
                f"data.robustness.splits: {dataset} publishes no corrupted split "
                f"{missing[0]!r} (it has: {', '.join(have) or 'none'}); generate corruptions "
                "with data.robustness.corruptions instead")
    elif dataset.startswith("imagefolder:"):
        from attndrift.data.imagefolder import check_imagefolder

        try:
            check_imagefolder(dataset, tuple(splits))
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None


def load_named_split(dataset: str, split: str, image_size: int = 224,
                     progress: bool = False) -> ImageTask:
    """Split ``split`` of a hub dataset (registered or ``hf:``) or an image folder, through the
    loader that reads its train and test splits."""
    from attndrift.data.hf import REAL_DATASETS, load_hf, parse_hf_name
    from attndrift.data.registry import load_task

    if dataset in REAL_DATASETS or dataset.startswith("hf:"):
        source = REAL_DATASETS.get(dataset) or parse_hf_name(dataset)
        source = dataclasses.replace(source, splits={**source.splits, split: split})
        return load_hf(dataset, source, split, image_size, progress)
    return load_task(dataset, split, image_size=image_size, progress=progress)


def robustness_tasks(dataset: str, test: ImageTask, *, splits: list[str],
                     corruptions: list[str], severities: list[int], images: int | None,
                     seed: int, image_size: int = 224,
                     progress: bool = False) -> dict[str, ImageTask]:
    """The corrupted splits to score, by name: each published split as it is named, each
    generated one as ``corruption@severity`` (from ``test``). With ``images``, each is a
    class-balanced subset of that many (seeded by ``seed``; the generated ones corrupt the
    same subset of ``test``)."""
    out: dict[str, ImageTask] = {}
    for split in splits:
        task = load_named_split(dataset, split, image_size, progress)
        if task.class_names != test.class_names:
            raise ValueError(f"{dataset}: split {split!r} has classes {task.class_names[:3]}..., "
                             f"the test split {test.class_names[:3]}...: not the same task")
        if images is not None:
            task = task.subset(balanced_subset(task.labels, images, seed))
        out[split] = dataclasses.replace(task, name=f"{dataset}/{split}")
    base = test if images is None else test.subset(balanced_subset(test.labels, images, seed))
    for name in corruptions:
        for severity in severities:
            out[f"{name}@{severity}"] = dataclasses.replace(
                base, name=f"{dataset}/{name}@{severity}",
                images=corrupt(base.images, name, severity, seed))
    return out


def robustness_summary(accuracy: dict[str, float], test_acc: float,
                       tasks: dict[str, ImageTask]) -> dict[str, Any]:
    """A record's ``robustness``: accuracy per corrupted split, their mean, the gap
    ``test_acc - mean`` (clean test accuracy minus the mean corrupted accuracy, as fractions),
    and each split's size and content fingerprint."""
    mean = sum(accuracy.values()) / len(accuracy)
    return {"accuracy": dict(accuracy), "mean": mean, "test_acc": test_acc,
            "gap": test_acc - mean,
            "splits": {name: {"images": len(t), "content": t.fingerprint()}
                       for name, t in tasks.items()}}
