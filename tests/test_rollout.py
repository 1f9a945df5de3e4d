"""Tests for full attention capture and attndrift.probes.rollout (closed forms, float64 loop)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from attndrift.probes import AttentionProbe, full_attention
from attndrift.probes.rollout import (
    attention_rollout,
    patch_to_patch_distance,
    patch_to_patch_entropy,
    rollout_cls_patch,
    rollout_summary,
)

N_LAYERS, N_HEADS, IMAGE, PATCH = 3, 4, 32, 8
N_TOKENS = 1 + (IMAGE // PATCH) ** 2


def _vision_model(attn: str) -> CLIPVisionModel:
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                              num_attention_heads=N_HEADS, image_size=IMAGE, patch_size=PATCH)
    model = CLIPVisionModel(config).eval()
    model.set_attn_implementation(attn)
    return model


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))


def _random_attn(b: int, layers: int, heads: int, t: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (3 * torch.randn(b, layers, heads, t, t, generator=g, dtype=dtype)).softmax(dim=-1)


# --- full attention capture ------------------------------------------------------------------


def test_full_attention_matches_eager_weights(pixels: torch.Tensor) -> None:
    eager = _vision_model("eager")
    with torch.no_grad():
        expected = torch.stack(eager(pixel_values=pixels, output_attentions=True).attentions, 1)
    got = full_attention(eager, pixels)
    assert got.shape == (3, N_LAYERS, N_HEADS, N_TOKENS, N_TOKENS)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert (got - expected).abs().max().item() < 1e-5
    # The same maps under SDPA (which returns no weights at all), for a subset of layers.
    sdpa = _vision_model("sdpa")
    assert (full_attention(sdpa, pixels, layers=[0, 2]) - expected[:, [0, 2]]).abs().max() < 1e-5
    # Row 0 of the full maps is what the CLS-row probe captures.
    with torch.no_grad(), AttentionProbe(sdpa) as probe:
        sdpa(pixel_values=pixels)
        cls_rows = probe.pop()
    assert (got[:, :, :, 0] - cls_rows).abs().max().item() < 1e-6


def test_full_probe_under_bf16_autocast_is_float32(pixels: torch.Tensor) -> None:
    model = _vision_model("sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = full_attention(model, pixels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]))


# --- rollout: closed forms ---------------------------------------------------------------------


def test_one_layer_rollout_is_half_attention_plus_half_identity() -> None:
    attn = _random_attn(2, 1, 3, 5)
    expected = 0.5 * attn.mean(dim=2)[:, 0] + 0.5 * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(attention_rollout(attn), expected, rtol=0, atol=1e-12)
    # residual 0 is plain head-averaged attention, residual 1 the identity
    torch.testing.assert_close(attention_rollout(attn, residual=0.0), attn.mean(2)[:, 0])
    torch.testing.assert_close(attention_rollout(attn, residual=1.0), torch.eye(5).double()
                               .expand(2, 5, 5))


def test_uniform_attention_gives_uniform_cls_rollout() -> None:
    t, n = 17, 16
    attn = torch.full((2, 4, 3, t, t), 1.0 / t)
    rollout = attention_rollout(attn)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, t))
    cls_patch = rollout_cls_patch(rollout)
    assert cls_patch.shape == (2, n)
    torch.testing.assert_close(cls_patch, torch.full((2, n), 1.0 / n))
    summary = rollout_summary(attn)
    assert summary["rollout_entropy"] == pytest.approx(math.log(n), abs=1e-5)
    assert summary["rollout_gini"] == pytest.approx(0.0, abs=1e-6)
    assert summary["rollout_erf"] == pytest.approx(math.ceil(0.95 * n) / n)
    assert summary["p2p_entropy"] == pytest.approx(math.log(n), abs=1e-5)
    assert summary["p2p_entropy_layers"] == pytest.approx([math.log(n)] * 4, abs=1e-5)


def test_p2p_entropy_of_uniform_and_one_hot() -> None:
    t, n = 10, 9
    uniform = torch.full((2, 3, 2, t, t), 1.0 / t)
    torch.testing.assert_close(patch_to_patch_entropy(uniform), torch.full((3,), math.log(n)))
    # every patch attends to one patch only: zero entropy, and exact zeros give no NaN
    one_hot = torch.zeros(1, 2, 1, t, t)
    one_hot[..., 3] = 1.0
    torch.testing.assert_close(patch_to_patch_entropy(one_hot), torch.zeros(2))


def _loop_rollout(attn: np.ndarray, residual: float) -> np.ndarray:
    b, layers, _, t, _ = attn.shape
    out = np.zeros((b, t, t))
    for i in range(b):
        r = np.eye(t)
        for layer in range(layers):
            a = residual * np.eye(t) + (1 - residual) * attn[i, layer].mean(axis=0)
            a = a / a.sum(axis=1, keepdims=True)
            r = a @ r
        out[i] = r
    return out


def _loop_p2p(attn: np.ndarray) -> np.ndarray:
    b, layers, heads, t, _ = attn.shape
    out = np.zeros(layers)
    for layer in range(layers):
        values = []
        for i in range(b):
            for h in range(heads):
                for q in range(1, t):
                    row = attn[i, layer, h, q, 1:]
                    row = row / row.sum()
                    values.append(-(row * np.log(row)).sum())
        out[layer] = np.mean(values)
    return out


def _loop_p2p_distance(attn: np.ndarray) -> np.ndarray:
    """Dosovitskiy et al.'s mean attention distance by loops: per patch query, the renormalised
    patch weights times the distance between patch centres (grid units), averaged."""
    b, layers, heads, t, _ = attn.shape
    side = math.isqrt(t - 1)
    pos = [(k // side, k % side) for k in range(t - 1)]
    out = np.zeros(layers)
    for layer in range(layers):
        values = []
        for i in range(b):
            for h in range(heads):
                for q in range(1, t):
                    row = attn[i, layer, h, q, 1:] / attn[i, layer, h, q, 1:].sum()
                    values.append(sum(a * math.dist(pos[q - 1], pos[k])
                                      for k, a in enumerate(row)))
        out[layer] = np.mean(values)
    return out


def test_p2p_distance_of_uniform_and_local_attention() -> None:
    """2x2 grid (T = 5): uniform patch rows give (2 + sqrt 2) / 4 in patch widths; every patch
    attending only to itself (or to the CLS and itself) gives 0."""
    uniform = torch.full((2, 3, 2, 5, 5), 0.2, dtype=torch.float64)
    torch.testing.assert_close(patch_to_patch_distance(uniform),
                               torch.full((3,), (2 + math.sqrt(2)) / 4, dtype=torch.float64))
    local = 0.5 * torch.eye(5, dtype=torch.float64).expand(1, 2, 1, 5, 5).clone()
    local[..., 0] += 0.5
    torch.testing.assert_close(patch_to_patch_distance(local), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="square grid"):
        patch_to_patch_distance(torch.full((1, 1, 1, 6, 6), 1 / 6))


@pytest.mark.parametrize("residual", [0.5, 0.2])
def test_against_float64_loop_reference(residual: float) -> None:
    attn = _random_attn(3, 4, 2, 10)  # 9 patches: a 3x3 grid
    ref = _loop_rollout(attn.numpy(), residual)
    np.testing.assert_allclose(attention_rollout(attn, residual).numpy(), ref, atol=1e-12)
    got32 = attention_rollout(attn.float(), residual)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(patch_to_patch_entropy(attn).numpy(), _loop_p2p(attn.numpy()),
                               atol=1e-12)
    np.testing.assert_allclose(patch_to_patch_entropy(attn.float()).numpy(),
                               _loop_p2p(attn.numpy()), atol=1e-5)
    cls_ref = ref[:, 0, 1:] / ref[:, 0, 1:].sum(-1, keepdims=True)
    ent_ref = float(np.mean(-(cls_ref * np.log(cls_ref)).sum(-1)))
    assert rollout_summary(attn, residual)["rollout_entropy"] == pytest.approx(ent_ref, abs=1e-12)
    np.testing.assert_allclose(patch_to_patch_distance(attn).numpy(),
                               _loop_p2p_distance(attn.numpy()), atol=1e-12)
    summary = rollout_summary(attn, residual)
    assert summary["p2p_distance_layers"] == pytest.approx(_loop_p2p_distance(attn.numpy()),
                                                           abs=1e-12)
    assert summary["p2p_distance"] == pytest.approx(_loop_p2p_distance(attn.numpy()).mean(),
                                                    abs=1e-12)


def test_bf16_input_is_scored_in_float32() -> None:
    attn = _random_attn(2, 3, 2, 10).to(torch.bfloat16)
    assert attention_rollout(attn).dtype == torch.float32
    assert patch_to_patch_entropy(attn).dtype == torch.float32
    summary = rollout_summary(attn)
    assert all(math.isfinite(v) for v in summary.values() if not isinstance(v, list))


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\[B, L, H, T, T\]"):
        attention_rollout(torch.rand(2, 3, 4, 5))
    with pytest.raises(ValueError, match="residual"):
        attention_rollout(torch.rand(1, 1, 1, 3, 3), residual=1.5)
