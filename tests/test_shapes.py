"""The built-in shapes world: determinism, task structure, splits and vocabulary coverage."""

from __future__ import annotations

import hashlib

import pytest
import torch

from attndrift.data import available_tasks, load_task
from attndrift.data.shapes import (
    ATTRIBUTES,
    SHAPES,
    annotated_corpus,
    caption_attributes,
    clear_cache,
    pretrain_corpus,
    vocabulary,
    words_of,
)

TASKS = {  # name: (kind, splits, number of classes)
    "shapes-layout": ("classification", ("train", "test"), 10),
    "shapes-objects": ("classification", ("train", "test"), 48),
    "shapes-zs-shape": ("zeroshot", ("test",), len(SHAPES)),
    "shapes-zs-colour": ("zeroshot", ("test",), 6),
}


def _image_hashes(images: torch.Tensor) -> set[str]:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images}


def test_tasks_registered_with_their_kinds() -> None:
    tasks = available_tasks()
    for name, (kind, _, _) in TASKS.items():
        assert tasks[name].kind == kind


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_structure_and_balance(name: str) -> None:
    _, splits, n_classes = TASKS[name]
    for split in splits:
        task = load_task(name, split)
        assert task.images.dtype == torch.uint8
        assert task.images.shape[1:] == (3, 32, 32)
        assert task.labels.dtype == torch.int64
        assert task.num_classes == n_classes == len(set(task.class_names))
        counts = torch.bincount(task.labels, minlength=n_classes)
        assert int(counts.min()) == int(counts.max()) > 0, "classes must be exactly balanced"
        assert len(task.templates) >= 3 and all("{}" in t for t in task.templates)
    # images vary (no degenerate constant renders)
    assert task.images.float().std() > 10


def test_task_sizes() -> None:
    assert len(load_task("shapes-layout", "train")) == 2000
    assert len(load_task("shapes-layout", "test")) == 500
    assert len(load_task("shapes-objects", "train")) == 3600
    assert len(load_task("shapes-objects", "test")) == 720
    assert len(load_task("shapes-zs-shape", "test")) >= 1000
    assert len(load_task("shapes-zs-colour", "test")) >= 1000


def test_deterministic_and_order_independent() -> None:
    clear_cache()
    a = load_task("shapes-objects", "test")
    clear_cache()  # render again from scratch ...
    load_task("shapes-layout", "test")  # ... after drawing something else
    b = load_task("shapes-objects", "test")
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
    assert torch.equal(a.labels, b.labels) and a.fingerprint() == b.fingerprint()
    other = load_task("shapes-objects", "test", seed=1)  # a different draw on request
    assert not torch.equal(a.images, other.images)


def test_cached_loads_are_independent_copies() -> None:
    a = load_task("shapes-zs-colour", "test")
    reference = a.images.clone()
    a.images.zero_()
    a.labels.zero_()
    b = load_task("shapes-zs-colour", "test")
    assert torch.equal(b.images, reference) and int(b.labels.max()) > 0


@pytest.mark.parametrize("name", ["shapes-layout", "shapes-objects"])
def test_train_and_test_disjoint(name: str) -> None:
    train, test = load_task(name, "train"), load_task(name, "test")
    assert not torch.equal(train.images[: len(test)], test.images)
    assert not _image_hashes(train.images) & _image_hashes(test.images)


def test_unknown_split_raises() -> None:
    with pytest.raises(ValueError, match="split"):
        load_task("shapes-zs-shape", "train")
    with pytest.raises(ValueError, match="split"):
        load_task("shapes-layout", "validation")


def test_pretrain_corpus_deterministic() -> None:
    x1, c1 = pretrain_corpus(300, seed=0)
    x2, c2 = pretrain_corpus(300, seed=0)
    x3, c3 = pretrain_corpus(300, seed=1)
    assert x1.dtype == torch.uint8 and x1.shape == (300, 3, 32, 32) and len(c1) == 300
    assert x1.numpy().tobytes() == x2.numpy().tobytes() and c1 == c2
    assert not torch.equal(x1, x3) and c1 != c3
    assert len(_image_hashes(x1)) == 300  # jitter: no two images equal


def test_captions_describe_their_images() -> None:
    images, captions, attrs = annotated_corpus(500, seed=3)
    mentioned = caption_attributes(captions)
    for key in ATTRIBUTES:
        m = mentioned[key]
        assert bool(((m < 0) | (m == attrs[key])).all()), f"a caption names the wrong {key}"
        assert bool((m >= 0).any()), f"no caption mentions a {key}"
    # attributes are rendered: colour shows in the mean object hue (red images are reddest)
    red = attrs["colour"] == 0
    redness = images[:, 0].float().mean(dim=(1, 2)) - images[:, 1].float().mean(dim=(1, 2))
    assert redness[red].mean() > redness[~red].mean() + 5


def test_vocabulary_covers_captions_class_names_and_templates() -> None:
    vocab = set(vocabulary())
    _, captions = pretrain_corpus(1000, seed=0)
    words = {w for c in captions for w in words_of(c)}
    for name, (_, splits, _) in TASKS.items():
        task = load_task(name, splits[-1])
        words |= {w for c in task.class_names for t in task.templates
                  for w in words_of(t.format(c))}
    assert words <= vocab, f"missing from vocabulary: {sorted(words - vocab)}"
    assert "{" not in "".join(vocab)
