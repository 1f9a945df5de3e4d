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
    map_entropy,
)


def _maps(seed: int, shape=(4, 3, 2, 9), sharpness: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (sharpness * torch.randn(*shape, generator=g)).softmax(dim=-1)


def test_registry() -> None:
    expected = {"apr": apr_loss, "entropy_floor": entropy_floor_loss, "l2sp": l2sp_loss}
    assert expected == {name: reg.loss for name, reg in REGULARIZERS.items()}


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


def test_entropy_floor_is_a_hinge_per_map_closed_form() -> None:
    # maps of known entropy over N = 4 patches: uniform (log 4), uniform on 2 (log 2), one-hot (0)
    uniform4 = torch.full((4,), 0.25)
    uniform2 = torch.tensor([0.5, 0.5, 0.0, 0.0])
    onehot = torch.tensor([1.0, 0.0, 0.0, 0.0])
    p = torch.empty(2, 2, 2, 4)  # [B, L, H, N]
    p[:, :] = uniform4
    p[1, 0, 1] = uniform2  # layer 0: one map of four at log 2
    p[0, 1, 0] = onehot  # layer 1: one map of four at 0
    log2 = math.log(2.0)
    tau = torch.tensor([1.5 * log2, log2])
    h = layer_entropy(p)
    torch.testing.assert_close(h, torch.tensor([1.75 * log2, 1.5 * log2]))
    assert (h > tau).all()  # every layer mean is above its floor: a layer-mean hinge gives 0
    # the study's hinge per map: layer 0 falls short by 0.5 log 2 on 1 map of 4, layer 1 by
    # log 2 on 1 map of 4
    expected = 0.5 * log2 / 4 + log2 / 4
    assert entropy_floor_loss(p, tau).item() == pytest.approx(expected, abs=1e-6)
    assert entropy_floor_loss(p, tau, reduction="mean").item() == pytest.approx(
        expected / 2, abs=1e-6)
    assert entropy_floor_loss(p, torch.tensor([0.5 * log2, -0.1])).item() == 0.0  # all above
    # float64 reference on random maps
    q = _maps(2, sharpness=3.0)
    tau_q = layer_entropy(q).detach() + torch.tensor([-0.3, 0.0, 0.2])
    q64 = q.double()
    maps = -(q64 * q64.log()).sum(-1)  # [B, L, H]
    ref = (tau_q.double()[None, :, None] - maps).clamp_min(0).mean(dim=(0, 2)).sum()
    assert entropy_floor_loss(q, tau_q).item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ValueError, match="one floor per captured layer"):
        entropy_floor_loss(p, [1.0, 2.0, 3.0])


def test_entropy_floor_gradient_raises_only_the_maps_below() -> None:
    logits = 3.0 * torch.randn(4, 3, 2, 9, generator=torch.Generator().manual_seed(2))
    logits.requires_grad_(True)
    maps = map_entropy(logits.softmax(-1)).detach()  # [B, L, H]
    # layer 0: floor under its lowest map; layers 1, 2: floor at the layer mean
    tau = maps.mean(dim=(0, 2)).clone()
    tau[0] = maps[:, 0].min() - 0.1
    loss = entropy_floor_loss(logits.softmax(-1), tau)
    loss.backward()
    below = maps < tau[None, :, None]
    assert below[:, 1:].any() and not below[:, 0].any()
    # no gradient on any map above its floor, some on every map below it
    assert logits.grad[~below].abs().max() == 0
    assert (logits.grad[below].abs().sum(-1) > 0).all()
    with torch.no_grad():
        stepped = map_entropy((logits - 0.5 * logits.grad).softmax(-1))
    assert (stepped[below] > maps[below]).all()


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
