"""Tiny CLIP construction, contrastive pretraining, and the shipped model's zero-shot ability."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attndrift.data import load_task
from attndrift.data.shapes import pretrain_corpus, vocabulary
from attndrift.models.clip import TINY_CLIP_DIR, load_clip
from attndrift.models.tiny import EOS_ID, MAX_TEXT_LENGTH, UNK_ID, build_tokenizer
from attndrift.pretrain import multi_positive_clip_loss, pretrain_tiny
from attndrift.zeroshot import clip_image_encoder, text_classifier, zeroshot_accuracy

SHORT = {"steps": 30, "batch_size": 32, "lr": 3e-3, "seed": 7, "progress": False}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tiny") / "clip"
    return out, pretrain_tiny(out, **SHORT)


def test_tokenizer_covers_the_world_and_wraps_in_bos_eos() -> None:
    tok = build_tokenizer(vocabulary())
    assert len(tok) == len(vocabulary()) + 4
    _, captions = pretrain_corpus(500, seed=0)
    batch = tok(captions, padding=True, truncation=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not bool((ids == UNK_ID).any()), "a caption word maps to <unk>"
    assert ids.shape[1] <= MAX_TEXT_LENGTH
    last = mask.sum(dim=1) - 1
    assert bool((ids[torch.arange(len(ids)), last] == EOS_ID).all())  # eos ends every caption
    assert bool(((ids == EOS_ID).sum(dim=1) == 1).all())
    long = tok(" ".join(["circle"] * 100), truncation=True)["input_ids"]
    assert len(long) == MAX_TEXT_LENGTH and long[-1] == EOS_ID  # truncation keeps eos


def test_multi_positive_loss_reduces_to_infonce() -> None:
    logits = torch.randn(6, 6)
    eye = torch.eye(6, dtype=torch.bool)
    labels = torch.arange(6)
    ref = (torch.nn.functional.cross_entropy(logits, labels)
           + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(multi_positive_clip_loss(logits, eye), ref)
    assert not torch.allclose(multi_positive_clip_loss(logits, torch.ones(6, 6) > 0), ref)


def test_short_pretraining_lowers_loss_and_writes_loadable_dir(short_run) -> None:
    out, info = short_run
    assert info["loss_last"] < info["loss_first"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "MODEL_CARD.md", "pretrain_info.json"):
        assert (out / name).is_file(), name
    loaded = load_clip(str(out))
    assert len(loaded.tokenizer) == len(vocabulary()) + 4
    ids = loaded.tokenizer(["a photo of a red circle.", "a star"], padding=True,
                           return_tensors="pt")
    assert set(ids) >= {"input_ids", "attention_mask"}
    assert int(ids["input_ids"][1, int(ids["attention_mask"][1].sum()) - 1]) == EOS_ID
    assert loaded.model.config.text_config.eos_token_id == EOS_ID != 2
    assert loaded.image_size == 32 and loaded.mean == pytest.approx(info["image_mean"])
    for name in ("shapes-zs-shape", "shapes-zs-colour", "shapes-layout", "shapes-objects"):
        assert 0.0 <= info["zeroshot"][name]["accuracy"] <= 1.0
    assert "attndrift pretrain-tiny" in (out / "MODEL_CARD.md").read_text()


def test_same_seed_same_weights(short_run, tmp_path: Path) -> None:
    out, _ = short_run
    pretrain_tiny(tmp_path, **SHORT)
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def one_thread():
    # Small forward passes: one thread is about as fast as two, and far faster when the 2-core
    # test machine is busy (a 2-thread pool then waits on descheduled workers at every op).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_shipped_model_zero_shot_well_above_chance(one_thread) -> None:
    loaded = load_clip("tiny")
    encode = clip_image_encoder(loaded.model)
    for name in ("shapes-zs-shape", "shapes-zs-colour"):
        task = load_task(name, "test")
        weights = text_classifier(loaded.model, loaded.tokenizer, task.class_names,
                                  task.templates)
        acc = zeroshot_accuracy(encode, weights, task, loaded.preprocessor())
        assert acc >= 3.0 / task.num_classes, f"{name}: {acc:.3f}"


def test_shipped_dir_is_small() -> None:
    size = sum(p.stat().st_size for p in TINY_CLIP_DIR.iterdir() if p.is_file())
    assert size <= 5 * 2**20, f"{size / 2**20:.1f} MiB"
