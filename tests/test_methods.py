"""The method and regularizer registries, enumerated (a new entry is covered the day it is
registered), the later protocol's methods, and the field roles that decide run ids and
settings."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from attndrift import interpolate
from attndrift import methods as specs
from attndrift.analysis.runs import (
    METHOD_SPECIFIC,
    NOT_A_FACTOR,
    factors,
    flat_config,
    method_label,
    regularizer_label,
    setting_key,
)
from attndrift.analysis.settings import labels_of, setting_order
from attndrift.config import OPERATIONAL_KEYS, RunConfig, identity
from attndrift.interpolate import SCHEMES, _Interpolator
from attndrift.models.adapt import METHODS, adapt, merge_lora, method_kwargs
from attndrift.models.classifier import CLIPClassifier
from attndrift.models.clip import load_clip
from attndrift.probes import AttentionProbe, renormalize_patches
from attndrift.probes.drift import vision_weight_snapshot, weight_drift
from attndrift.records import run_id_for
from attndrift.regularizers import REGULARIZERS, Batch, Pretrained
from attndrift.report.style import METHOD_COLORS, REG_HATCHES, REG_LINESTYLES, REG_MARKERS

# A value other than the default for every method-specific key.
OTHER = {"freeze_layers": 2, "lora.r": 4, "lora.alpha": 8.0, "lora.dropout": 0.1,
         "lora.targets": ["q_proj", "k_proj", "v_proj"], "lora.train_projection": False}


@pytest.fixture
def tiny():
    """A fresh tiny CLIP per test: a classifier shares its tower, which training changes."""
    return load_clip("tiny")


def _images(tiny, n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return tiny.preprocessor()(images)


def _config(method: str, **dotted) -> dict:
    data: dict = {"method": method}
    if method == "freeze":
        data["freeze_layers"] = 1
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return RunConfig.model_validate(data).model_dump(mode="json")


def _step(model: torch.nn.Module, x: torch.Tensor, steps: int = 1, lr: float = 1e-2) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    y = torch.arange(len(x)) % 3
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def test_both_sides_of_each_registry_name_the_same_entries():
    assert set(METHODS) == set(specs.METHODS)
    assert set(REGULARIZERS) == set(specs.REGULARIZERS)
    assert set(SCHEMES) == set(specs.METHODS)
    config_methods = RunConfig.model_fields["method"].annotation.__args__
    assert set(config_methods) == set(specs.METHODS)


@pytest.mark.parametrize("name", list(specs.METHODS))
def test_every_method_builds_trains_and_is_labelled(tiny, name):
    spec = specs.METHODS[name]
    cfg = _config(name)
    torch.manual_seed(0)
    model = CLIPClassifier.from_clip(tiny.model, 3)
    adapted = adapt(model, name, **method_kwargs(name, cfg))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and "head.weight" in before
    assert torch.isfinite(torch.tensor(_step(adapted.model, _images(tiny))))
    changed = [n for n, p in model.named_parameters() if n in before
               and not torch.equal(p, before[n])]
    assert "head.weight" in changed
    # the text tower is never part of the classifier; the projection trains as the spec says
    assert not any(n.startswith("text_model.") for n, _ in model.named_parameters())
    assert model.visual_projection.weight.requires_grad == spec.trains_projection(
        flat_config(cfg))
    # label, colour, interpolation scheme
    assert method_label(cfg).startswith(spec.label) and spec.label
    assert METHOD_COLORS[name] == spec.color
    assert f"- {SCHEMES[name]} (" in interpolate.__doc__  # a documented scheme


@pytest.mark.parametrize("name", list(specs.METHODS))
def test_a_setting_holds_exactly_the_keys_its_method_reads(name):
    """Changing a key the method reads makes a new setting (DoRA reusing the lora section
    must not pool its ranks as seeds); changing any other method-specific key does not."""
    spec = specs.METHODS[name]
    base = _config(name)
    assert set(factors(base)) & METHOD_SPECIFIC <= set(spec.reads)
    for key, value in OTHER.items():
        if key == "freeze_layers" and name != "freeze":
            continue  # refused by the config for every other method
        changed = _config(name, **{key: value})
        split = setting_key(changed) != setting_key(base)
        assert split == (key in spec.reads), key


def test_methods_reading_lora_show_its_options_in_their_label():
    for name, spec in specs.METHODS.items():
        if "lora.r" not in spec.reads:
            continue
        sets = [factors(_config(name, **{"lora.r": r})) for r in (4, 8)]
        assert labels_of(sets) == [f"{spec.label} r=4", f"{spec.label} r=8"]
        frozen = factors(_config(name, **{"lora.train_projection": False}))
        assert spec.label_of(frozen).endswith("(proj frozen)")


@pytest.mark.parametrize("name", list(specs.REGULARIZERS))
def test_every_regularizer_applies_one_step_and_is_labelled(tiny, name):
    spec = specs.REGULARIZERS[name]
    reg = REGULARIZERS[name]
    torch.manual_seed(0)
    model = adapt(CLIPClassifier.from_clip(tiny.model, 3), "full_ft").model
    x = _images(tiny, 4)
    layers = list(range(tiny.model.config.vision_config.num_hidden_layers))

    def cache() -> torch.Tensor:  # [image, flip, L, H, N] maps of other images: APR > 0
        with torch.no_grad(), AttentionProbe(model.vision_model, None) as probe:
            model(_images(tiny, 4, seed=1))
            maps = renormalize_patches(probe.pop())
        return torch.stack([maps, maps], dim=1)

    state = reg.prepare(Pretrained(model, None, 0.7, torch.device("cpu"), cache))
    state = reg.start(state, [10.0] * len(layers))  # a floor above every map: entropy_floor > 0
    with torch.no_grad():  # move the weights off the pretrained ones: L2-SP > 0
        model.vision_model.encoder.layers[0].mlp.fc1.weight.add_(0.1)
    grab = AttentionProbe(model.vision_model, None, detach=False) if reg.attention else None
    with grab or contextlib.nullcontext():
        logits = model(x)
    maps = renormalize_patches(grab.pop()) if grab is not None else None
    penalty = reg.penalty(state, Batch(model, maps, torch.arange(4), None))
    assert penalty.dim() == 0 and penalty.dtype == torch.float32
    (F.cross_entropy(logits, torch.arange(4) % 3) + penalty).backward()
    if reg.attention:  # the penalty reaches the attention projections
        assert model.vision_model.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert float(penalty.detach()) > 0
    assert reg.attention == spec.attention
    label = regularizer_label({"regularizer": {"name": name, "lam": 0.5}})
    assert label.startswith(spec.label) and "λ=0.5" in label
    assert name in REG_LINESTYLES and name in REG_MARKERS and name in REG_HATCHES


@pytest.mark.parametrize("name", list(specs.REGULARIZERS))
def test_a_setting_holds_exactly_the_keys_its_regularizer_reads(name):
    spec = specs.REGULARIZERS[name]
    base = _config("full_ft", **{"regularizer.name": name, "regularizer.lam": 1.0})
    for key, value in (("regularizer.lam", 2.0), ("regularizer.layers", [0]),
                       ("regularizer.ratio", 0.5)):
        changed = _config("full_ft", **{"regularizer.name": name, "regularizer.lam": 1.0,
                                        key: value})
        assert (setting_key(changed) != setting_key(base)) == (key in spec.reads), key


def test_last_block_trains_exactly_the_later_protocols_modules(tiny):
    torch.manual_seed(0)
    model = adapt(CLIPClassifier.from_clip(tiny.model, 3), "last_block").model
    last = len(model.vision_model.encoder.layers) - 1
    expected = {n for n, _ in model.named_parameters()
                if n.startswith((f"vision_model.encoder.layers.{last}.",
                                 "vision_model.post_layernorm.", "visual_projection.", "head."))}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected and "head.weight" in expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, _images(tiny), steps=3)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in expected), n


@pytest.mark.parametrize("train_projection", [True, False])
def test_lora_train_projection(tiny, train_projection):
    torch.manual_seed(0)
    model = adapt(CLIPClassifier.from_clip(tiny.model, 3), "lora", r=2,
                  train_projection=train_projection).model
    before = model.visual_projection.weight.detach().clone()
    _step(model, _images(tiny), steps=3)
    assert torch.equal(model.visual_projection.weight, before) == (not train_projection)
    assert model.visual_projection.weight.requires_grad == train_projection


def test_field_roles_reproduce_the_keys_decided_before_they_were_declared():
    assert OPERATIONAL_KEYS == (("train", "checkpoint_every"), ("train", "checkpoint_minutes"),
                                ("data", "resident_mb"), ("tensorboard",),
                                # added since: experiment trackers log, they do not train
                                ("trackers",), ("save_checkpoints",))
    assert {
        "name", "seed", "device", "tensorboard", "trackers", "save_checkpoints", "train.compile",
        "train.log_every", "train.checkpoint_every", "train.checkpoint_minutes",
        "data.eval_batch_size", "data.resident_mb", "data.zeroshot", "probe.batch_size",
        "probe.precision", "probe.aux", "probe.aux_every", "probe.zeroshot_every",
        "probe.zeroshot_images",
        # added since: corrupted-split accuracy is an extra measurement, like data.zeroshot
        "data.robustness"} == NOT_A_FACTOR
    measured = _config("full_ft", **{"data.robustness": {"corruptions": ["contrast"]}})
    assert setting_key(measured) == setting_key(_config("full_ft"))
    assert run_id_for(identity(measured)) != run_id_for(identity(_config("full_ft")))


def test_a_field_added_later_keeps_earlier_run_ids_and_settings():
    """lora.train_projection is omitted from ids and settings at its default: the defaults'
    run id is the one pinned before the field existed, and a record without the key is the
    same setting as one with the default."""
    # the tracking cadence runs had when these ids were pinned (before and after training
    # only); the once-per-epoch default since issue 23 has ids of its own (test_protocol)
    earlier = {"probe": {"aux_every": 0, "zeroshot_every": 0}}
    dump = RunConfig(method="lora", **earlier).model_dump(mode="json")
    assert dump["lora"]["train_projection"] is True
    assert "train_projection" not in identity(dump)["lora"]
    # ids computed on main before the field existed
    assert run_id_for(identity(RunConfig(**earlier).model_dump(mode="json"))) == "run-b1b96f18"
    assert run_id_for(identity(dump)) == "run-de58354e"
    old = json.loads(json.dumps(dump))
    del old["lora"]["train_projection"]
    assert setting_key(old) == setting_key(dump)
    frozen = RunConfig(method="lora", lora={"train_projection": False}).model_dump(mode="json")
    assert run_id_for(identity(frozen)) != run_id_for(identity(dump))
    assert setting_key(frozen) != setting_key(dump)


@pytest.mark.parametrize("name", list(specs.METHODS))
def test_every_methods_interpolation_ends_at_pretrained_and_adapted(tiny, name):
    """The method's interpolation scheme (`SCHEMES`) walks its trained encoder back to
    exactly the pretrained one at alpha 0 and to itself at alpha 1."""
    pretrained = {n: p.detach().clone() for n, p in tiny.model.named_parameters()
                  if n.startswith(("vision_model.", "visual_projection."))}
    x = _images(tiny)
    torch.manual_seed(0)
    model = CLIPClassifier.from_clip(tiny.model, 3)
    with torch.no_grad():
        before = model.eval().embed(x)
    model = adapt(model, name, **method_kwargs(name, _config(name))).model
    _step(model.train(), x, steps=3)
    with torch.no_grad():
        after = model.eval().embed(x)
        walker = _Interpolator(model, pretrained)
        walker.set(0.0)
        at0 = model.embed(x)
        walker.restore()
        at1 = model.embed(x)
    torch.testing.assert_close(at0, before, atol=1e-5, rtol=0)
    torch.testing.assert_close(at1, after, atol=1e-6, rtol=0)
    assert (SCHEMES[name] == "none") == torch.allclose(after, before, atol=1e-5)


def test_settings_sort_by_method_rank_then_the_keys_it_reads():
    cfgs = [_config("lora", **{"lora.train_projection": False}), _config("dora"),
            _config("lora", **{"lora.r": 16}), _config("lora"), _config("full_ft")]
    order = sorted(cfgs, key=setting_order)
    assert [method_label(c) for c in order] == [
        "full FT", "LoRA r=8 α=16", "LoRA r=8 α=16 (proj frozen)", "LoRA r=16 α=16",
        "DoRA r=8 α=16"]


@pytest.mark.parametrize("name", list(specs.METHODS))
def test_every_methods_weight_drift_is_that_of_its_merged_weights(tiny, name):
    """Weight drift reads the weights a method's forward uses (DoRA: PEFT's own merge of the
    variant), so the adapted model and its merged export drift the same."""
    torch.manual_seed(0)
    model = CLIPClassifier.from_clip(tiny.model, 3)
    reference = vision_weight_snapshot(model)
    adapted = adapt(model, name, **method_kwargs(name, _config(name)))
    _step(adapted.model, _images(tiny), steps=2)
    drift = weight_drift(adapted.model, reference)
    merged = weight_drift(merge_lora(adapted), reference)
    assert drift["total"] == pytest.approx(merged["total"], rel=1e-5, abs=1e-9)
    assert (drift["total"] > 0) == (SCHEMES[name] != "none")


def test_a_guarded_setting_is_labelled_by_its_guard_in_one_part():
    """The guard keys of a guarded setting read as one part (action, signal's short label,
    threshold, start), not one 'guard.key value' part per key; the unguarded one shows none."""
    plain = factors(_config("full_ft"))
    guarded = factors(_config("full_ft", guard={"signal": "abs_d_entropy", "threshold": 25,
                                                "start": 0.2, "action": "stop"}))
    cka = factors(_config("full_ft", guard={"signal": "cka_mean", "threshold": 0.9}))
    lora = factors(_config("lora"))
    assert labels_of([plain, guarded, lora, cka]) == [
        "full FT", "full FT · guard: stop at |Δ entropy| > 25 from 20%", "LoRA r=8",
        "full FT · guard: warn at CKA mean < 0.9"]
    # only the guard varies: the unguarded setting is still named (by its method)
    assert labels_of([plain, guarded]) == ["full FT", "guard: stop at |Δ entropy| > 25 from 20%"]
