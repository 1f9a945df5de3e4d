"""Tests for attndrift.probes.capture against transformers' own eager attention weights."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from attndrift.probes import AttentionProbe, cls_patch_attention
from attndrift.probes.metrics import renormalize_patches

N_LAYERS, N_HEADS, IMAGE, PATCH = 3, 4, 32, 8
N_TOKENS = 1 + (IMAGE // PATCH) ** 2


def _vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        image_size=IMAGE,
        patch_size=PATCH,
    )


def _vision_model(attn: str = "eager", seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    model = CLIPVisionModel(_vision_config()).eval()
    model.set_attn_implementation(attn)
    return model


def _clip_model(attn: str = "eager") -> CLIPModel:
    torch.manual_seed(0)
    config = CLIPConfig(
        vision_config=_vision_config().to_dict(),
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 64,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    model.set_attn_implementation(attn)
    return model


@pytest.fixture()
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))


def _eager_cls_rows(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """transformers' eager attention weights, CLS query row: [B, L, H, T]."""
    with torch.no_grad():
        out = model(pixel_values=pixels, output_attentions=True)
    assert len(out.attentions) == N_LAYERS
    return torch.stack([a[:, :, 0, :] for a in out.attentions], dim=1)


def _probe_rows(model: nn.Module, pixels: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad(), AttentionProbe(model, **kwargs) as probe:
        model(pixel_values=pixels)
        return probe.pop()


def _qk_hooks(model: nn.Module) -> int:
    return sum(
        len(module._forward_hooks)
        for name, module in model.named_modules()
        if name.endswith(("q_proj", "k_proj"))
    )


def test_probe_matches_eager_attention(pixels: torch.Tensor) -> None:
    model = _vision_model("eager")
    expected = _eager_cls_rows(model, pixels)
    got = _probe_rows(model, pixels)
    assert got.shape == (3, N_LAYERS, N_HEADS, N_TOKENS)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-5
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(3, N_LAYERS, N_HEADS))


def test_probe_same_under_sdpa(pixels: torch.Tensor) -> None:
    eager = _vision_model("eager")
    sdpa = _vision_model("sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    expected = _eager_cls_rows(eager, pixels)
    got = _probe_rows(sdpa, pixels)
    assert (got - expected).abs().max().item() < 1e-5


def test_probe_on_clip_model_uses_vision_tower(pixels: torch.Tensor) -> None:
    model = _clip_model()
    expected = _eager_cls_rows(model.vision_model, pixels)
    with torch.no_grad(), AttentionProbe(model) as probe:
        model.get_image_features(pixel_values=pixels)
        got = probe.pop()
    assert (got - expected).abs().max().item() < 1e-5
    # The convenience function runs .vision_model and renormalises over the patches.
    patches = cls_patch_attention(model, pixels)
    assert patches.shape == (3, N_LAYERS, N_HEADS, N_TOKENS - 1)
    assert (patches - renormalize_patches(expected)).abs().max().item() < 1e-5


def test_probe_inside_wrapper_module(pixels: torch.Tensor) -> None:
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.head = nn.Linear(32, 2)
            self.vision_model = inner

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.head(self.vision_model(pixel_values=pixel_values).pooler_output)

    inner = _vision_model()
    expected = _eager_cls_rows(inner, pixels)
    wrapper = Wrapper(inner)
    assert (_probe_rows(wrapper, pixels) - expected).abs().max().item() < 1e-5
    patches = cls_patch_attention(wrapper, pixels, layers=[1])
    assert (patches - renormalize_patches(expected[:, 1:2])).abs().max().item() < 1e-5


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_probe_includes_lora_delta(pixels: torch.Tensor) -> None:
    base = _vision_model("eager")
    base_rows = _eager_cls_rows(base, pixels)
    lora = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    # LoRA B starts at zero (a no-op); make the adapter actually change q.
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    q_proj = lora.base_model.model.encoder.layers[0].self_attn.q_proj
    assert type(q_proj).__module__.startswith("peft."), "LoRA was not injected into q_proj"

    expected = _eager_cls_rows(lora, pixels)
    got = _probe_rows(lora, pixels)
    assert (got - expected).abs().max().item() < 1e-5
    assert (got - base_rows).abs().max().item() > 1e-3
    assert _qk_hooks(lora) == 0


def test_hooks_removed_on_exit_and_on_exception(pixels: torch.Tensor) -> None:
    model = _vision_model()
    layer0 = model.encoder.layers[0].self_attn
    probe = AttentionProbe(model)
    with probe:
        assert _qk_hooks(model) == 2 * N_LAYERS
        assert probe.active
        model(pixel_values=pixels)
    assert _qk_hooks(model) == 0
    assert not probe.active
    assert len(layer0.q_proj._forward_hooks) == 0 and len(layer0.k_proj._forward_hooks) == 0
    # Rows captured inside the context are still available after it.
    assert probe.pop().shape[0] == 3

    with pytest.raises(KeyError), AttentionProbe(model):
        model(pixel_values=pixels)
        raise KeyError("boom")
    assert _qk_hooks(model) == 0


def test_probe_cannot_be_nested(pixels: torch.Tensor) -> None:
    model = _vision_model()
    probe = AttentionProbe(model)
    with probe:
        with pytest.raises(RuntimeError, match="already active"), probe:
            pass
        assert _qk_hooks(model) == 2 * N_LAYERS
    assert _qk_hooks(model) == 0


def test_pop_without_capture_raises(pixels: torch.Tensor) -> None:
    model = _vision_model()
    with AttentionProbe(model, layers=[0, 2]) as probe:
        with pytest.raises(RuntimeError, match=r"no attention captured.*\[0, 2\]"):
            probe.pop()
        model(pixel_values=pixels)
        assert probe.pop().shape[0] == 3
        # pop() cleared the buffer.
        with pytest.raises(RuntimeError, match="no attention captured"):
            probe.pop()
    # Forwards outside the context are not captured.
    model(pixel_values=pixels)
    with pytest.raises(RuntimeError, match="no attention captured"):
        probe.pop()


def test_multiple_forwards_concatenate(pixels: torch.Tensor) -> None:
    model = _vision_model()
    expected = _eager_cls_rows(model, pixels)
    with torch.no_grad(), AttentionProbe(model) as probe:
        model(pixel_values=pixels[:1])
        model(pixel_values=pixels[1:])
        got = probe.pop()
    assert got.shape[0] == 3
    assert (got - expected).abs().max().item() < 1e-5


def test_module_without_attention_layers_raises() -> None:
    with pytest.raises(ValueError, match="no CLIP/ViT-style attention layers found in Sequential"):
        AttentionProbe(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_layer_selection(pixels: torch.Tensor) -> None:
    model = _vision_model()
    expected = _eager_cls_rows(model, pixels)
    probe = AttentionProbe(model, layers=[0, 2])
    assert probe.layers == (0, 2)
    with torch.no_grad(), probe:
        model(pixel_values=pixels)
        # Only layers 0 and 2 are hooked.
        assert len(model.encoder.layers[1].self_attn.q_proj._forward_hooks) == 0
        assert len(model.encoder.layers[2].self_attn.k_proj._forward_hooks) == 1
        got = probe.pop()
    assert got.shape == (3, 2, N_HEADS, N_TOKENS)
    assert (got - expected[:, [0, 2]]).abs().max().item() < 1e-5
    assert AttentionProbe(model, layers=[-1]).layers == (N_LAYERS - 1,)
    with pytest.raises(ValueError, match="out of range"):
        AttentionProbe(model, layers=[N_LAYERS])
    with pytest.raises(ValueError, match="duplicate"):
        AttentionProbe(model, layers=[1, 1])


def test_detach_false_backpropagates_to_q_proj(pixels: torch.Tensor) -> None:
    model = _vision_model("sdpa")
    with AttentionProbe(model, detach=False) as probe:
        model(pixel_values=pixels)
        rows = probe.pop()
    assert rows.requires_grad
    # Entropy of the CLS->patch maps of every layer: a regulariser-style scalar.
    patches = renormalize_patches(rows)
    loss = torch.special.entr(patches).sum()
    loss.backward()
    grad = model.encoder.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum().item() > 0


def test_detach_true_has_no_graph(pixels: torch.Tensor) -> None:
    model = _vision_model()
    with AttentionProbe(model) as probe:
        model(pixel_values=pixels)  # grad enabled outside the probe
        rows = probe.pop()
    assert not rows.requires_grad
    assert rows.grad_fn is None


def test_rows_are_float32_under_autocast(pixels: torch.Tensor) -> None:
    model = _vision_model("sdpa")
    reference = _probe_rows(model, pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _probe_rows(model, pixels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(3, N_LAYERS, N_HEADS))
    # bf16 projections perturb the logits a little; the softmax itself ran in float32.
    assert (got - reference).abs().max().item() < 0.05
