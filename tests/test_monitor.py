"""Tests for attndrift.monitor: AttentionMonitor, the Trainer callback, ViT support, the docs."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    CLIPModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from attndrift.monitor import AttentionMonitor, AttnDriftCallback, flat_scalars
from attndrift.probes import cls_patch_attention, full_attention, renormalize_patches
from attndrift.probes.metrics import METRICS

ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 2
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": N_LAYERS,
          "num_attention_heads": 4, "image_size": 32, "patch_size": 8}


def _classifier() -> CLIPForImageClassification:
    torch.manual_seed(0)
    return CLIPForImageClassification(CLIPConfig(vision_config=VISION, num_labels=3))


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_monitor_baseline_measure_drift_and_modes() -> None:
    model = _classifier()
    model.train()
    model.classifier.eval()  # a submodule deliberately in eval mode stays so
    monitor = AttentionMonitor(model, _pixels(10), batch_size=4)
    assert model.training and not model.classifier.training
    base = monitor.baseline
    assert len(base["entropy"]["layers"]) == N_LAYERS
    assert monitor.history == []
    assert monitor.drift() == pytest.approx({m: 0.0 for m in METRICS}, abs=1e-9)
    assert len(monitor.history) == 1 and monitor.history[0]["step"] is None
    with torch.no_grad():
        model.vision_model.encoder.layers[1].self_attn.q_proj.weight.mul_(4.0)
    metrics = monitor.measure(step=7)
    assert monitor.history[-1]["step"] == 7
    drift = monitor.drift()
    assert drift["entropy"] != 0.0 and drift == monitor.history[-1]["drift"]
    h, h0 = metrics["mean"]["entropy"], base["mean"]["entropy"]
    assert drift["entropy"] == pytest.approx(100 * (h - h0) / h0)
    assert monitor.reset_baseline() is monitor.baseline
    assert monitor.drift(metrics)["entropy"] == pytest.approx(0.0, abs=1e-9)
    scalars = flat_scalars(metrics, drift)
    assert scalars["attn/entropy_mean"] == h and "attn/gini_L1" in scalars
    assert scalars["attn/entropy_delta_pct"] == drift["entropy"]


def test_clip_model_and_unsupported_models() -> None:
    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "vocab_size": 64, "max_position_embeddings": 16,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    clip = CLIPModel(CLIPConfig(vision_config=VISION, text_config=text, projection_dim=16))
    monitor = AttentionMonitor(clip, _pixels(4))
    assert monitor.tower is clip.vision_model  # never the text tower
    assert len(monitor.baseline["gini"]["heads"]) == N_LAYERS
    with pytest.raises(ValueError, match="supported are CLIP-style vision towers"):
        AttentionMonitor(nn.Sequential(nn.Conv2d(3, 4, 3)), _pixels(2))
    with pytest.raises(ValueError, match="non-empty"):
        AttentionMonitor(clip, torch.zeros(0, 3, 32, 32))


def test_vit_model_is_supported() -> None:
    torch.manual_seed(0)
    config = ViTConfig(**{k: v for k, v in VISION.items()}, num_labels=3)
    vit = ViTModel(config, add_pooling_layer=False).eval()
    vit.set_attn_implementation("eager")
    pixels = _pixels(3)
    with torch.no_grad():
        eager = torch.stack(vit(pixel_values=pixels, output_attentions=True).attentions, 1)
    assert (full_attention(vit, pixels) - eager).abs().max() < 1e-5
    got = cls_patch_attention(vit, pixels)
    assert (got - renormalize_patches(eager[:, :, :, 0])).abs().max() < 1e-5
    monitor = AttentionMonitor(ViTForImageClassification(config), pixels)
    assert len(monitor.baseline["entropy"]["layers"]) == N_LAYERS


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.x = _pixels(n, seed=3)
        self.y = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class _Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_callback_in_a_real_trainer(tmp_path: Path) -> None:
    model = _classifier()
    callback = AttnDriftCallback(_pixels(12), every_n_steps=2, batch_size=8)
    recorder = _Recorder()  # registered before the drift callback once attach() moves it
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=8,
                             learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=100, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Dataset(40), callbacks=[recorder])
    callback.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()

    assert [h["step"] for h in callback.history] == [2, 4, 5]  # every 2 steps and the last
    assert callback.baseline is not None
    for entry in callback.history:
        assert all(math.isfinite(v) for v in entry["drift"].values())
        assert all(math.isfinite(v) for v in entry["metrics"]["entropy"]["layers"])
    logged = [e for e in trainer.state.log_history if "attn/entropy_mean" in e]
    assert [e["step"] for e in logged] == [2, 4, 5]
    for entry, h in zip(logged, callback.history, strict=True):
        assert "loss" in entry  # the callback made the Trainer log at its steps
        assert entry["attn/entropy_mean"] == h["metrics"]["mean"]["entropy"]
        assert entry["attn/entropy_delta_pct"] == h["drift"]["entropy"]
        # layers counted from 1, as TensorBoard and the report do
        assert {f"attn/entropy_L{i}" for i in range(1, N_LAYERS + 1)} <= set(entry)
        assert "attn/entropy_L0" not in entry
    # callbacks after it (reporting integrations once attached first) saw the scalars too
    assert sum("attn/entropy_delta_pct" in log for log in recorder.logs) == 3
    assert model.training  # the Trainer's mode is untouched by the probes


def test_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docs" / "probe_api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "probe_api_docs"}
    exec(compile("\n".join(blocks), "docs/probe_api.md", "exec"), namespace)
    assert len(namespace["callback"].history) == 2
    assert len(namespace["entropy_logs"]) == 2
    assert math.isfinite(namespace["loss"].item())
    # the guard examples stop early, at the first crossing
    stopped = namespace["guard"].stopped
    assert stopped is not None and stopped["step"] < 40 and stopped["value"] > 0.05
    assert namespace["guarded"].history[-1]["step"] == stopped["step"]
    step = namespace["stop_guard"].stopped["step"]
    assert step == namespace["guarded_trainer"].state.global_step < 40
