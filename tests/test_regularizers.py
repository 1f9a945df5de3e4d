"""Tests for attndrift.regularizers: values, gradients through the probe, float32 numerics."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from attndrift.probes import AttentionProbe, renormalize_patches
from attndrift.regularizers import (
    REGULARIZERS,
    apr_loss,
    entropy_floor_loss,
    entropy_floor_targets,
    l2sp_loss,
    layer_entropy,
)


def _maps(seed: int, shape=(4, 3, 2, 9), sharpness: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (sharpness * torch.randn(*shape, generator=g)).softmax(dim=-1)


def test_registry() -> None:
    expected = {"apr": apr_loss, "entropy_floor": entropy_floor_loss, "l2sp": l2sp_loss}
    assert expected == REGULARIZERS


def test_apr_is_kl_and_zero_at_reference() -> None:
    p, q = _maps(0), _maps(1)
    assert apr_loss(p, p).item() == pytest.approx(0.0, abs=1e-7)
    got = apr_loss(p, q)
    assert got.dtype == torch.float32 and got.dim() == 0 and got.item() > 0
    p64, q64 = p.double(), q.double()
    ref = (p64 * (p64.log() - q64.log())).sum(-1).mean()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="reference"):
        apr_loss(p, q[:2])


def _tiny_vision() -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            image_size=32, patch_size=8))


def test_apr_gradient_reaches_q_proj_through_probe() -> None:
    model = _tiny_vision()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), AttentionProbe(model) as probe:  # the pretrained reference
        model(pixel_values=pixels)
        reference = renormalize_patches(probe.pop())
    with torch.no_grad():  # "training" moved the queries
        model.encoder.layers[1].self_attn.q_proj.weight.mul_(3.0)
    with AttentionProbe(model, detach=False) as probe:
        model(pixel_values=pixels)
        current = renormalize_patches(probe.pop())
    loss = apr_loss(current, reference)
    assert loss.item() > 0
    loss.backward()
    grad = model.encoder.layers[1].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # a gradient step reduces the KL
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
        with AttentionProbe(model) as probe:
            model(pixel_values=pixels)
            after = apr_loss(renormalize_patches(probe.pop()), reference)
    assert after.item() < loss.item()


def test_entropy_floor_values_and_gradient_sign() -> None:
    p = _maps(2, sharpness=3.0)
    h = layer_entropy(p)
    assert h.shape == (3,)
    torch.testing.assert_close(h, (-(p * p.log()).sum(-1)).mean(dim=(0, 2)))
    assert entropy_floor_loss(p, h - 0.1).item() == 0.0  # every layer above its floor
    tau = h.clone()
    tau[1] += 0.25
    tau[2] += 0.5
    assert entropy_floor_loss(p, tau).item() == pytest.approx(0.75, abs=1e-5)
    assert entropy_floor_loss(p, tau, reduction="mean").item() == pytest.approx(0.25, abs=1e-5)
    # gradient descent on the penalty raises the entropy of the layers below the floor only
    logits = (3.0 * torch.randn(4, 3, 2, 9, generator=torch.Generator().manual_seed(2)))
    logits.requires_grad_(True)
    loss = entropy_floor_loss(logits.softmax(-1), tau)
    loss.backward()
    assert logits.grad[:, 0].abs().max() == 0  # layer 0 is above its floor: no gradient
    with torch.no_grad():
        stepped = layer_entropy((logits - 0.5 * logits.grad).softmax(-1))
    assert stepped[1] > h[1] and stepped[2] > h[2]
    with pytest.raises(ValueError, match="one floor per captured layer"):
        entropy_floor_loss(p, [1.0, 2.0])


def test_entropy_floor_targets() -> None:
    tau = entropy_floor_targets([2.0, 3.0, 4.0])
    assert tau.dtype == torch.float32
    torch.testing.assert_close(tau, torch.tensor([1.4, 2.1, 2.8]))
    torch.testing.assert_close(entropy_floor_targets(torch.tensor([1.0, 2.0]), ratio=0.5),
                               torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="ratio"):
        entropy_floor_targets([1.0], ratio=0.0)


def test_l2sp_closed_form_and_gradient() -> None:
    params = {"a": torch.zeros(3, requires_grad=True), "b": torch.ones(2, 2, requires_grad=True)}
    reference = {"a": torch.ones(3), "b": torch.zeros(2, 2), "unused": torch.zeros(1)}
    loss = l2sp_loss(params, reference)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(7.0)
    loss.backward()
    torch.testing.assert_close(params["a"].grad, torch.full((3,), -2.0))
    torch.testing.assert_close(params["b"].grad, torch.full((2, 2), 2.0))
    with pytest.raises(KeyError, match="no reference"):
        l2sp_loss({"c": torch.zeros(1)}, reference)


def test_finite_in_float32_under_bf16_autocast_with_exact_zeros() -> None:
    # one-hot maps (exact zeros) in bf16, against a reference that is zero where they are not
    current = torch.zeros(2, 3, 2, 8, dtype=torch.bfloat16)
    current[..., 0] = 1.0
    current[0, 0, 0] = torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0, 0], dtype=torch.bfloat16)
    current.requires_grad_(True)
    reference = torch.zeros(2, 3, 2, 8, dtype=torch.bfloat16)
    reference[..., 1] = 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        apr = apr_loss(current, reference)
        floor = entropy_floor_loss(current, torch.full((3,), 1.0))
        l2 = l2sp_loss({"w": current}, {"w": reference})
    for loss in (apr, floor, l2):
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert apr.item() > 50  # mass where the reference is 0: large (log tiny ~ -87), not inf
    (apr + floor + l2).backward()
    assert torch.isfinite(current.grad.float()).all()
    assert apr_loss(current.detach(), current.detach()).item() == pytest.approx(0.0, abs=1e-7)
    assert math.isfinite(layer_entropy(current.detach()).sum().item())
