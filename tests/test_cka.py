"""Tests for attndrift.probes.cka: invariances, n x n Gram references, numerics, layerwise use."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import CLIPVisionConfig, CLIPVisionModel

from attndrift.probes.cka import layer_representations, layerwise_cka, linear_cka

N_LAYERS = 3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gram_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Reference: HSIC with explicit n x n centring matrices."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l_).sum() / torch.sqrt((k * k).sum() * (l_ * l_).sum()))


def _unbiased_hsic(k: torch.Tensor, l_: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    k, l_ = k - torch.diag(torch.diag(k)), l_ - torch.diag(torch.diag(l_))
    one = torch.ones(n, dtype=k.dtype)
    return (torch.trace(k @ l_) + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ k @ l_ @ one)) / (n * (n - 3))


def _gram_cka_debiased(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    k, l_ = x @ x.T, y @ y.T
    return float(_unbiased_hsic(k, l_) / torch.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(l_, l_)))


@pytest.mark.parametrize("debiased", [False, True])
def test_matches_gram_reference_and_identity(debiased: bool) -> None:
    x = torch.randn(40, 12, generator=_gen(1))
    y = x @ torch.randn(12, 7, generator=_gen(2)) + 0.5 * torch.randn(40, 7, generator=_gen(3))
    ref = _gram_cka_debiased(x, y) if debiased else _gram_cka(x, y)
    got = linear_cka(x, y, debiased)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(ref, abs=1e-10)
    assert linear_cka(x, x, debiased).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariant_to_rotation_scaling_translation(debiased: bool) -> None:
    x = torch.randn(50, 10, generator=_gen(4), dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(10, 10, generator=_gen(5), dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=_gen(6), dtype=torch.float64))
    base = linear_cka(x, y, debiased).item()
    assert 0.1 < base < 0.99
    assert linear_cka(x @ q, y, debiased).item() == pytest.approx(base, abs=1e-12)
    assert linear_cka(x, 7.5 * y + 3.0, debiased).item() == pytest.approx(base, abs=1e-12)
    assert linear_cka(y, x, debiased).item() == pytest.approx(base, abs=1e-12)  # symmetric


def test_independent_representations_score_low() -> None:
    x = torch.randn(1000, 8, generator=_gen(7))
    y = torch.randn(1000, 8, generator=_gen(8))
    assert linear_cka(x, y).item() < 0.05
    assert abs(linear_cka(x, y, debiased=True).item()) < 0.01


def test_debiased_agrees_with_biased_for_large_n() -> None:
    x = torch.randn(4000, 6, generator=_gen(9), dtype=torch.float64)
    y = x @ torch.randn(6, 6, generator=_gen(10), dtype=torch.float64)
    y = y + torch.randn(4000, 6, generator=_gen(11), dtype=torch.float64)
    biased, debiased = linear_cka(x, y).item(), linear_cka(x, y, debiased=True).item()
    assert biased == pytest.approx(debiased, abs=0.01)
    # and at small n with many features the bias is large, the debiased value is not
    a = torch.randn(20, 200, generator=_gen(12))
    b = torch.randn(20, 200, generator=_gen(13))
    assert linear_cka(a, b).item() > 0.5
    assert abs(linear_cka(a, b, debiased=True).item()) < 0.2


@pytest.mark.parametrize("debiased", [False, True])
def test_constant_and_extreme_magnitudes_are_finite(debiased: bool) -> None:
    x = torch.randn(30, 5, generator=_gen(14))
    const = torch.full((30, 5), 0.1)
    assert linear_cka(const, x, debiased).item() == 0.0
    assert linear_cka(x, const, debiased).item() == 0.0
    assert linear_cka(torch.zeros(30, 3), torch.zeros(30, 4), debiased).item() == 0.0
    y = x[:, :3] ** 2
    ref = linear_cka(x, y, debiased).item()
    for scale in (1e-20, 1e20):
        got = linear_cka((x * scale).float(), (y * scale).float(), debiased).item()
        assert math.isfinite(got) and got == pytest.approx(ref, abs=1e-6)
    assert linear_cka(x.double() * 1e-200, y.double(), debiased).item() == pytest.approx(
        ref, abs=1e-6)
    with pytest.raises(ValueError, match="NaN or inf"):
        linear_cka(torch.full((4, 2), math.nan), x[:4])


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="same n"):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(torch.randn(3, 2), torch.randn(3, 2), debiased=True)


# --- representations of a real tower ---------------------------------------------------------


def _vision_model() -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        image_size=32, patch_size=8)).eval()


def test_layer_representations_and_layerwise_cka() -> None:
    model = _vision_model()
    pixels = torch.randn(12, 3, 32, 32, generator=_gen(15))
    model.train()
    reps = layer_representations(model, pixels, batch_size=5)
    assert model.training  # mode restored
    assert set(reps) == {"cls", "patch_mean"}
    assert reps["cls"].shape == reps["patch_mean"].shape == (N_LAYERS, 12, 32)
    with torch.no_grad():
        hidden = model.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(reps["cls"][-1], hidden[-1][:, 0])
    torch.testing.assert_close(reps["patch_mean"][0], hidden[1][:, 1:].mean(1))

    same = layerwise_cka(reps, reps)
    assert same["cls"] == pytest.approx([1.0] * N_LAYERS)
    # Change only the last layer: earlier layers keep CKA 1, the last drops.
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.encoder.layers[-1].mlp.fc1.weight.mul_(-3.0)
    result = layerwise_cka(reps, layer_representations(other, pixels), debiased=False)
    assert result["cls"][:-1] == pytest.approx([1.0] * (N_LAYERS - 1))
    assert result["cls"][-1] < 0.999 and result["patch_mean"][-1] < 0.999


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_layer_representations_through_peft_wrapper() -> None:
    model = _vision_model()
    pixels = torch.randn(6, 3, 32, 32, generator=_gen(16))
    base = layer_representations(model, pixels)
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    # fresh LoRA (B = 0) changes nothing
    torch.testing.assert_close(layer_representations(lora, pixels)["cls"], base["cls"])
