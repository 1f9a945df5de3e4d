"""Zero-shot per task: template sets, raw vs cleaned names, balanced subsets, and the scores
(top-1, top-5, mean per-class recall) against an independent computation."""

import numpy as np
import pytest
import torch

from attndrift.data.base import ImageTask
from attndrift.data.prompts import (
    OPENAI_CIFAR,
    TEMPLATE_SETS,
    check_templates,
    zeroshot_view,
)
from attndrift.zeroshot import classification_scores, text_classifier


def _task(n_per_class=10, raw=("aquarium_fish", "maple_tree", "pickup_truck")):
    labels = torch.arange(len(raw)).repeat_interleave(n_per_class)
    images = torch.randint(0, 255, (len(labels), 3, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return ImageTask("t", images, labels, [r.replace("_", " ") for r in raw],
                     ["a photo of a {}."], list(raw))


def test_named_sets_and_checks():
    assert len(OPENAI_CIFAR) == 18 and len(set(OPENAI_CIFAR)) == 18
    assert all(t.count("{}") == 1 for t in OPENAI_CIFAR)
    assert TEMPLATE_SETS["paper21"] == ("a photo of a {}",)
    assert TEMPLATE_SETS["later"] == ("a photo of a {}.",)
    for bad in ("no_such_set", ["a photo"], ["{} and {}"], ["a {name}"], []):
        with pytest.raises(ValueError):
            check_templates(bad)


def test_view_names_templates_and_balanced_subset():
    task = _task()
    raw, entry = zeroshot_view(task, templates="paper21", names="raw")
    assert raw.class_names == ["aquarium_fish", "maple_tree", "pickup_truck"]
    assert raw.templates == ["a photo of a {}"] and entry["names"] == "raw"
    clean, entry2 = zeroshot_view(task, templates="later")
    assert clean.class_names == ["aquarium fish", "maple tree", "pickup truck"]
    assert entry["content"] != entry2["content"]  # the names are part of the content
    sub, entry3 = zeroshot_view(task, images=12, seed=5)
    assert entry3["images"] == 12 and torch.bincount(sub.labels).tolist() == [4, 4, 4]
    assert torch.equal(sub.images, zeroshot_view(task, images=12, seed=5)[0].images)
    with pytest.raises(ValueError, match="asks for 31 images"):
        zeroshot_view(task, images=31)


def test_paper21_prompt_gives_other_text_features_than_the_later_one():
    from attndrift.models.clip import load_clip

    loaded = load_clip("tiny")
    task = _task(raw=("red_circle", "blue_square", "green_triangle"))

    def features(preset: str, names: str) -> torch.Tensor:
        view, _ = zeroshot_view(task, templates=preset, names=names)
        return text_classifier(loaded.model, loaded.tokenizer, view.class_names, view.templates)

    dim = loaded.model.config.projection_dim
    # the full stop alone moves every class's feature (same cleaned names) ...
    paper, later = features("paper21", "clean"), features("later", "clean")
    assert paper.shape == later.shape == (3, dim)
    assert ((paper * later).sum(-1) < 1 - 1e-4).all()
    # ... and paper21's raw names are other words again ("red_circle" is one unknown token to
    # the tiny CLIP's word-level vocabulary, as underscored names are rare words to CLIP's)
    raw = features("paper21", "raw")
    assert ((raw * paper).sum(-1) < 1 - 1e-4).all()


def test_scores_match_an_independent_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 9))
    labels = rng.integers(0, 9, size=200)
    labels[:20] = 3  # unbalanced classes: mean recall differs from top-1
    got = classification_scores(torch.tensor(logits), torch.tensor(labels))
    pred = logits.argmax(1)
    top5 = np.mean([lab in np.argsort(-row)[:5] for row, lab in zip(logits, labels,
                                                                      strict=True)])
    recall = np.mean([np.mean(pred[labels == c] == c) for c in np.unique(labels)])
    assert got["top1"] == pytest.approx(np.mean(pred == labels), abs=1e-12)
    assert got["top5"] == pytest.approx(top5, abs=1e-12)
    assert got["mean_recall"] == pytest.approx(recall, abs=1e-12)
    assert got["mean_recall"] != pytest.approx(got["top1"])
    assert classification_scores(torch.tensor(logits[:, :5]), torch.tensor(labels % 5))[
        "top5"] is None  # five classes: top-5 would be 1 by construction


def test_zeroshot_summary_takes_scores_or_plain_accuracies():
    from attndrift.evaluate import zeroshot_summary

    task = _task()
    scores = {"top1": 0.5, "top5": None, "mean_recall": 0.45}
    full = zeroshot_summary({"t": {**scores, "top1": 0.8}}, {"t": scores}, {"t": task},
                            {"t": {"names": "raw"}})["t"]
    assert (full["before"], full["after"], full["retention_pct"]) == (0.8, 0.5, 62.5)
    assert full["mean_recall"] == {"before": 0.45, "after": 0.45}
    assert full["prompt"] == {"names": "raw"}
    mixed = zeroshot_summary({"t": 0.8}, {"t": scores}, {"t": task})["t"]  # older resume
    assert (mixed["before"], mixed["after"]) == (0.8, 0.5) and "top5" not in mixed
