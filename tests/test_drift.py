"""Tests for attndrift.probes.drift: stable names, known drift, LoRA = merged weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import CLIPConfig, CLIPModel

from attndrift.models.classifier import CLIPClassifier
from attndrift.probes.drift import (
    embedding_drift,
    vision_weight_snapshot,
    weight_drift,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
N_LAYERS = 3
Q0 = "vision_model.encoder.layers.0.self_attn.q_proj.weight"


def _clip() -> CLIPModel:
    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": N_LAYERS,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 64, "max_position_embeddings": 16,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    return CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()


def _lora(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                               "v_proj"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    return peft


def test_stable_names_across_wrappers() -> None:
    clip = _clip()
    snap = vision_weight_snapshot(clip)
    assert Q0 in snap and all(k.startswith("vision_model.") for k in snap)
    assert not any("text" in k or "visual_projection" in k for k in snap)
    assert set(vision_weight_snapshot(clip.vision_model)) == set(snap)
    classifier = CLIPClassifier.from_clip(clip, 3)
    assert set(vision_weight_snapshot(classifier)) == set(snap)
    lora = get_peft_model(classifier, LoraConfig(r=2, target_modules=["q_proj"]))
    after = vision_weight_snapshot(lora)
    assert set(after) == set(snap)  # base_layer removed, adapter tensors left out
    for key, value in snap.items():
        assert torch.equal(after[key], value)  # fresh LoRA: B = 0
    # the snapshot is a detached copy
    assert not snap[Q0].requires_grad and snap[Q0].data_ptr() != \
        clip.vision_model.encoder.layers[0].self_attn.q_proj.weight.data_ptr()


def test_zero_drift_at_init_and_with_fresh_lora() -> None:
    clip = _clip()
    reference = vision_weight_snapshot(clip)
    assert weight_drift(clip, reference) == {"total": 0.0, "per_layer": [0.0] * N_LAYERS}
    lora = get_peft_model(CLIPClassifier.from_clip(clip, 3),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert weight_drift(lora, reference) == {"total": 0.0, "per_layer": [0.0] * N_LAYERS}


def test_known_drift_of_a_perturbed_weight() -> None:
    clip = _clip()
    reference = vision_weight_snapshot(clip)
    delta = torch.randn(32, 32, generator=torch.Generator().manual_seed(5)) * 0.1
    with torch.no_grad():
        clip.vision_model.encoder.layers[1].self_attn.q_proj.weight.add_(delta)
    result = weight_drift(clip, reference)
    total_ref = math.sqrt(sum(float(v.double().pow(2).sum()) for v in reference.values()))
    layer1 = [v for k, v in reference.items() if k.startswith("vision_model.encoder.layers.1.")]
    layer_ref = math.sqrt(sum(float(v.double().pow(2).sum()) for v in layer1))
    norm = float(delta.double().norm())
    assert result["total"] == pytest.approx(norm / total_ref, rel=1e-6)
    assert result["per_layer"][0] == 0.0 and result["per_layer"][2] == 0.0
    assert result["per_layer"][1] == pytest.approx(norm / layer_ref, rel=1e-6)


def test_lora_drift_equals_merged_drift() -> None:
    clip = _clip()
    reference = vision_weight_snapshot(clip)
    peft = _lora(CLIPClassifier.from_clip(clip, 3))
    lora_drift = weight_drift(peft, reference)
    assert lora_drift["total"] > 0 and all(d > 0 for d in lora_drift["per_layer"])
    merged = copy.deepcopy(peft).merge_and_unload()
    merged_drift = weight_drift(merged, reference)
    assert lora_drift["total"] == pytest.approx(merged_drift["total"], rel=1e-5)
    assert lora_drift["per_layer"] == pytest.approx(merged_drift["per_layer"], rel=1e-5)
    # merged in place (PEFT's merge()) and with the adapters disabled
    peft.merge_adapter()
    assert weight_drift(peft, reference)["total"] == pytest.approx(lora_drift["total"], rel=1e-5)
    with peft.disable_adapter():
        assert weight_drift(peft, reference)["total"] == pytest.approx(0.0, abs=1e-6)


def test_mismatched_reference_raises() -> None:
    clip = _clip()
    reference = vision_weight_snapshot(clip)
    del reference[Q0]
    with pytest.raises(ValueError, match="different vision tensors"):
        weight_drift(clip, reference)
    reference = vision_weight_snapshot(clip)
    reference[Q0] = reference[Q0][:4]
    with pytest.raises(ValueError, match="shape"):
        weight_drift(clip, reference)


def test_embedding_drift() -> None:
    a = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    assert embedding_drift(a, a.clone()) == pytest.approx(0.0, abs=1e-6)
    assert embedding_drift(a, 3.0 * a) == pytest.approx(0.0, abs=1e-6)  # direction only
    assert embedding_drift(a, -a) == pytest.approx(2.0, abs=1e-6)
    e = torch.eye(4)
    assert embedding_drift(e[:2], e[2:]) == pytest.approx(1.0)
    assert math.isfinite(embedding_drift(torch.zeros(3, 4), a[:3, :4]))
    assert embedding_drift(a.bfloat16(), a.bfloat16()) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        embedding_drift(a, a[:5])
