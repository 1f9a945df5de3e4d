"""End to end on the shipped tiny CLIP: config -> run -> record -> restored model."""

import math

import numpy as np
import pytest
import torch

from attndrift.data.registry import load_task
from attndrift.models.adapt import adapt, merge_lora
from attndrift.models.classifier import CLIPClassifier
from attndrift.models.clip import load_clip
from attndrift.models.restore import restore_run
from attndrift.probes.metrics import METRICS
from attndrift.records import TOP_LEVEL_KEYS, read_record
from attndrift.train import probe_steps, run, warmup_cosine
from attndrift.zeroshot import clip_image_encoder, text_classifier, zeroshot_accuracy
from conftest import tiny_config


def test_record_is_complete(full_ft_run):
    rec = read_record(full_ft_run)
    assert set(TOP_LEVEL_KEYS) <= set(rec) and rec["status"] == "completed"
    layers = load_clip("tiny").model.config.vision_config.num_hidden_layers
    heads = load_clip("tiny").model.config.vision_config.num_attention_heads
    for block in (rec["baseline"], *(p["metrics"] for p in rec["history"]["probes"])):
        for m in ("entropy", "erf", "gini"):
            assert len(block[m]["layers"]) == layers
            assert [len(h) for h in block[m]["heads"]] == [heads] * layers
        assert len(block["head_diversity"]["layers"]) == layers
    # 10 steps, 3 probes per epoch -> steps 3, 7, 10
    assert [p["step"] for p in rec["history"]["probes"]] == [3, 7, 10]
    assert set(rec["zeroshot"]) == {"shapes-zs-shape", "shapes-zs-colour"}
    for z in rec["zeroshot"].values():
        assert 0 <= z["before"] <= 1 and 0 <= z["after"] <= 1
    final = rec["final"]
    assert set(final["delta_pct"]) == set(METRICS)
    assert len(final["delta_pct_layers"]["entropy"]) == layers
    # drift is computed from layer means, as the study defines it
    base_h, fin_h = rec["baseline"]["mean"]["entropy"], final["metrics"]["mean"]["entropy"]
    assert final["delta_pct"]["entropy"] == pytest.approx(100 * (fin_h - base_h) / base_h)
    prov = rec["provenance"]
    assert prov["data"]["sizes"] == {"train": 320, "val": prov["data"]["sizes"]["val"], "probe": 40}
    assert len(prov["data"]["val_ids"]) == 16 and prov["model_sha256"]
    assert prov["data"]["train_resident"] is True  # 320 tiny images << data.resident_mb
    assert all(math.isfinite(x["loss"]) for x in rec["history"]["loss"])
    assert (full_ft_run / "final.safetensors").is_file()
    assert (full_ft_run / "best.safetensors").is_file()


def test_restored_checkpoint_reproduces_the_record(full_ft_run):
    rec = read_record(full_ft_run)
    loaded, adapted = restore_run(full_ft_run)
    task = load_task("shapes-zs-shape", "test")
    weights = text_classifier(loaded.model, loaded.tokenizer, task.class_names, task.templates)
    acc = zeroshot_accuracy(adapted.model.embed, weights, task, loaded.preprocessor())
    assert acc == pytest.approx(rec["zeroshot"]["shapes-zs-shape"]["after"], abs=1e-9)


def test_lora_zeroshot_goes_through_the_adapters(lora_run):
    rec = read_record(lora_run)
    loaded, adapted = restore_run(lora_run)
    b_norm = sum(float(p.detach().norm()) for n, p in adapted.model.named_parameters()
                 if "lora_B" in n)
    assert b_norm > 0  # training moved the adapters away from their zero init
    pretrained = load_clip("tiny")
    task = load_task("shapes-zs-shape", "test")
    x = loaded.preprocessor()(task.images[:64])
    with torch.no_grad():
        adapted_emb = adapted.model.embed(x)
        base_emb = clip_image_encoder(pretrained.model)(x)
    assert float((adapted_emb - base_emb).abs().max()) > 1e-4
    weights = text_classifier(loaded.model, loaded.tokenizer, task.class_names, task.templates)
    acc = zeroshot_accuracy(adapted.model.embed, weights, task, loaded.preprocessor())
    assert acc == pytest.approx(rec["zeroshot"]["shapes-zs-shape"]["after"], abs=1e-9)
    # The same accuracy through the untouched pretrained encoder is the "before" number.
    base = zeroshot_accuracy(clip_image_encoder(pretrained.model), weights, task,
                             pretrained.preprocessor())
    assert base == pytest.approx(rec["zeroshot"]["shapes-zs-shape"]["before"], abs=1e-9)


def test_merged_and_unmerged_lora_give_the_same_logits():
    loaded = load_clip("tiny")
    torch.manual_seed(0)
    model = CLIPClassifier.from_clip(loaded.model, 5)
    adapted = adapt(model, "lora", r=4, alpha=8.0, dropout=0.05, targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    model.eval()
    x = loaded.preprocessor()(load_task("shapes-layout", "test").images[:16])
    with torch.no_grad():
        unmerged = model(x)
        merged_model = merge_lora(adapted)
        merged = merged_model(x)
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    assert float((unmerged - merged).abs().max()) < 1e-4
    assert float(unmerged.std()) > 0


@pytest.mark.parametrize(("method", "extra", "trainable", "frozen"), [
    ("full_ft", {}, ["vision_model.encoder.layers.0.mlp.fc1.weight", "head.weight"], []),
    ("linear_probe", {}, ["head.weight"], ["visual_projection.weight",
                                            "vision_model.encoder.layers.3.mlp.fc1.weight"]),
    # the study froze the first k encoder layers only: embeddings and pre-layernorm train
    ("freeze", {"layers": 2}, ["vision_model.encoder.layers.2.mlp.fc1.weight", "head.weight",
                               "vision_model.embeddings.patch_embedding.weight",
                               "vision_model.embeddings.position_embedding.weight",
                               "vision_model.embeddings.class_embedding",
                               "vision_model.pre_layrnorm.weight"],
     ["vision_model.encoder.layers.1.mlp.fc1.weight"]),
    ("lora", {"r": 2}, ["visual_projection.weight", "head.weight"],
     ["vision_model.encoder.layers.0.self_attn.q_proj.base_layer.weight"]),
])
def test_methods_choose_trainable_parameters(method, extra, trainable, frozen):
    loaded = load_clip("tiny")
    model = adapt(CLIPClassifier.from_clip(loaded.model, 3), method, **extra).model
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(grads[n] for n in trainable)
    assert not any(grads[n] for n in frozen)


def test_freeze_freezes_exactly_the_first_k_encoder_layers():
    loaded = load_clip("tiny")
    model = adapt(CLIPClassifier.from_clip(loaded.model, 3), "freeze", layers=3).model
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    in_first_3 = {n for n, _ in model.named_parameters()
                  if n.startswith(tuple(f"vision_model.encoder.layers.{i}." for i in range(3)))}
    assert frozen == in_first_3 and frozen


def test_freeze_rejects_too_many_layers():
    loaded = load_clip("tiny")
    with pytest.raises(ValueError, match="has 4 layers"):
        adapt(CLIPClassifier.from_clip(loaded.model, 3), "freeze", layers=9)


def test_nan_loss_stops_the_run_as_diverged(tmp_path):
    rec = run(tiny_config("tiny_full_ft", "train.lr=1e30", "train.grad_clip=null",
                          "save_checkpoints=false"), tmp_path, progress=False)
    assert rec["status"] == "diverged" and "lower train.lr" in rec["error"]
    on_disk = read_record(tmp_path)
    assert on_disk["status"] == "diverged" and on_disk["baseline"]["mean"]["entropy"] > 0


def test_schedule_and_probe_points():
    f = warmup_cosine(100, 0.05)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0)
    assert f(52) == pytest.approx(0.5, abs=0.02) and f(99) < 0.01
    assert probe_steps(10, 30, 5) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30]
    assert probe_steps(10, 25, 1) == [10, 20, 25]
    assert probe_steps(10, 25, 0) == [25]


@pytest.mark.parametrize("minutes", [0.0, 10.0])
def test_best_weights_and_time_based_checkpoints(tmp_path, monkeypatch, minutes):
    """best.safetensors holds the weights of the best validation epoch, kept in memory and
    written at the next checkpoint or the end; epoch-end checkpoints wait checkpoint_minutes."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    import attndrift.train as train
    from attndrift.models.classifier import trainable_state

    scores = iter([0.5, 0.9, 0.7, 0.6])  # epoch 2 is the best; the last is the test set
    seen: list[dict] = []

    def fake_accuracy(model, *args, **kwargs):
        seen.append({"weights": trainable_state(model, "cpu"),
                     "resume": (tmp_path / "resume.pt").is_file(),
                     "best_file": (tmp_path / "best.safetensors").is_file()})
        return next(scores)

    monkeypatch.setattr(train, "accuracy", fake_accuracy)
    cfg = tiny_config("tiny_full_ft", "train.epochs=3", "data.train_limit=64",
                      f"train.checkpoint_minutes={minutes}", "data.zeroshot=[]")
    rec = run(cfg, tmp_path, progress=False)
    assert rec["final"]["best_epoch"] == 2 and rec["final"]["best_val_acc"] == 0.9
    # the 4th call is the test accuracy; epochs 1-3 are the first three
    assert [s["resume"] for s in seen[:3]] == [False, minutes == 0, minutes == 0]
    assert [s["best_file"] for s in seen[:3]] == [False, minutes == 0, minutes == 0]
    best = load_file(tmp_path / "best.safetensors")
    assert best.keys() == seen[1]["weights"].keys()
    assert all(torch.equal(best[k], seen[1]["weights"][k]) for k in best)
    assert not all(torch.equal(best[k], seen[2]["weights"][k]) for k in best)
    with safe_open(tmp_path / "best.safetensors", "pt") as fh:
        assert fh.metadata()["epoch"] == "2"


def test_compiled_training_forward_trains_like_eager(full_ft_run, tmp_path):
    """train.compile runs the training forward through torch.compile (aot_eager here: the real
    dynamo + AOTAutograd path without a C++ build) and follows the eager run's losses."""
    eager = read_record(full_ft_run)
    compiled = run(tiny_config("tiny_full_ft", "train.compile=aot_eager"), tmp_path,
                   progress=False)
    assert compiled["status"] == "completed"
    assert compiled["config"]["train"]["compile"] == "aot_eager"
    got = [e["loss"] for e in compiled["history"]["loss"]]
    want = [e["loss"] for e in eager["history"]["loss"]]
    assert len(got) == len(want) >= 2
    np.testing.assert_allclose(got, want, rtol=1e-3)
    assert compiled["final"]["metrics"]["mean"]["entropy"] == pytest.approx(
        eager["final"]["metrics"]["mean"]["entropy"], rel=1e-3)


def test_zeroshot_follows_the_given_precision():
    """zeroshot_all runs the image encoder under the run's autocast (train.precision) and
    compares normalised float32 embeddings with the text weights."""
    from attndrift.evaluate import zeroshot_all

    loaded = load_clip("tiny")
    model = CLIPClassifier.from_clip(loaded.model, 3)
    task = load_task("shapes-zs-colour", "test")
    weights = {"c": text_classifier(loaded.model, loaded.tokenizer, task.class_names,
                                    task.templates)}
    dtypes = []
    hook = model.visual_projection.register_forward_hook(
        lambda _m, _i, out: dtypes.append(out.dtype))
    try:
        acc = {p: zeroshot_all(model, weights, {"c": task}, loaded.preprocessor(),
                               torch.device("cpu"), 256, p)["c"] for p in ("fp32", "bf16")}
    finally:
        hook.remove()
    assert set(dtypes) == {torch.float32, torch.bfloat16}
    assert acc["fp32"] > 0.9 and abs(acc["bf16"] - acc["fp32"]) < 0.05
