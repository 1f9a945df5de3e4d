"""The attention probe in anyone's training loop: ``AttentionMonitor`` and a HF Trainer callback.

``AttentionMonitor`` holds a fixed probe batch and measures the model's CLS->patch attention on
it (the study's four metrics per layer and head, `attndrift.probes.metrics.summarize`); the
first measurement, at construction, is the baseline, and ``drift`` is the study's
``delta m % = 100 (m - m_baseline) / m_baseline`` of the layer means. It works with any model
holding a supported vision tower (`attndrift.probes.capture.SUPPORTED`: CLIPModel,
CLIPVisionModel, CLIPForImageClassification, a classifier or PEFT model wrapping one, and
transformers >= 5 ViTModel / ViTForImageClassification).

``AttnDriftCallback`` plugs the monitor into a ``transformers.Trainer``: baseline at
``on_train_begin``, a measurement every ``every_n_steps`` optimizer steps (and at the last step),
and scalars such as ``attn/entropy_mean``, ``attn/entropy_delta_pct``, ``attn/entropy_L1`` in
the Trainer's logs. See docs/probe_api.md for a runnable example.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from attndrift.guard import Guard
from attndrift.probes.capture import cls_patch_attention, find_vision_tower
from attndrift.probes.metrics import METRICS, delta_pct, summarize
from attndrift.tracked import SIGNALS

__all__ = ["AttentionMonitor", "AttnDriftCallback", "flat_scalars"]


def flat_scalars(metrics: dict[str, Any], drift: dict[str, float] | None = None,
                 prefix: str = "attn/", per_layer: bool = True) -> dict[str, float]:
    """Loggable scalars of a ``summarize`` dict: ``{prefix}{m}_mean``, ``{prefix}{m}_L{i}``
    (per layer, counted from 1 as in TensorBoard and the report) and, given ``drift``,
    ``{prefix}{m}_delta_pct``, for every metric ``m``."""
    out: dict[str, float] = {}
    for m in METRICS:
        out[f"{prefix}{m}_mean"] = float(metrics["mean"][m])
        if drift is not None:
            out[f"{prefix}{m}_delta_pct"] = float(drift[m])
        if per_layer:
            for i, value in enumerate(metrics[m]["layers"]):
                out[f"{prefix}{m}_L{i + 1}"] = float(value)
    return out


class AttentionMonitor:
    """Measures a model's CLS->patch attention on a fixed probe batch.

    Args:
        model: any module holding a supported vision tower; measured as it is at each call.
        probe_pixel_values: ``[n, 3, S, S]`` preprocessed probe images (kept on CPU, moved to
            the tower's device and dtype batch by batch).
        layers: encoder layers to probe (all if None).
        batch_size: images per probe forward.
        baseline: a ``summarize`` dict to use as the baseline instead of measuring one now.
        guard: an early-warning `attndrift.guard.Guard` on an attention signal (``d_entropy``,
            ``abs_d_entropy``, ..., ``d_entropy_last``), checked at every ``measure``; with
            action ``stop``, ``should_stop`` turns true at the first crossing (your loop stops).

    Attributes:
        baseline: ``summarize`` dict of the model at construction (or ``reset_baseline``).
        history: one ``{"step", "time", "metrics", "drift"}`` dict per ``measure`` call.
    """

    def __init__(self, model: nn.Module, probe_pixel_values: torch.Tensor, *,
                 layers: Sequence[int] | None = None, batch_size: int = 64,
                 baseline: dict[str, Any] | None = None, guard: Guard | None = None) -> None:
        if guard is not None and SIGNALS[guard.signal].needs != "attention":
            known = [s.name for s in SIGNALS.values() if s.needs == "attention"]
            raise ValueError(f"AttentionMonitor measures attention only; guard one of "
                             f"{', '.join(known)}, not {guard.signal}")
        if probe_pixel_values.dim() != 4 or probe_pixel_values.shape[0] == 0:
            raise ValueError("probe_pixel_values must be a non-empty [n, C, H, W] batch, got "
                             f"shape {tuple(probe_pixel_values.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tower = find_vision_tower(model)  # fails here, clearly, for unsupported models
        self.pixel_values = probe_pixel_values.detach().cpu()
        self.layers = layers
        self.batch_size = batch_size
        self.history: list[dict[str, Any]] = []
        self.guard = guard
        self.baseline: dict[str, Any] = baseline if baseline is not None else self._summary()

    @property
    def should_stop(self) -> bool:
        """True once the guard (action stop) has seen its signal cross."""
        return self.guard is not None and self.guard.should_stop

    def attention(self) -> torch.Tensor:
        """The model's current CLS->patch maps of the probe batch, ``[n, L, H, N]`` float32 on
        CPU; every module's train/eval state is restored afterwards."""
        return self._attention().cpu()

    @torch.no_grad()
    def _attention(self) -> torch.Tensor:
        """``attention`` on the model's device (scored there; only the table comes back)."""
        param = next(self.tower.parameters())
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            parts = []
            for start in range(0, self.pixel_values.shape[0], self.batch_size):
                x = self.pixel_values[start : start + self.batch_size]
                x = x.to(device=param.device, dtype=param.dtype)
                parts.append(cls_patch_attention(self.tower, x, self.layers).float())
        finally:
            for module, training in flags:
                module.training = training
        return torch.cat(parts)

    def _summary(self) -> dict[str, Any]:
        return summarize(self._attention())

    def measure(self, step: int | None = None, fraction: float | None = None
                ) -> dict[str, Any]:
        """Measure now: returns the ``summarize`` dict and appends it (with ``step`` and its
        drift from the baseline) to ``history``; checks the guard (``fraction``: the share of
        training done, for its ``start``; None counts as past it)."""
        metrics = self._summary()
        entry = {"step": step, "time": time.time(), "metrics": metrics,
                 "drift": self.drift(metrics)}
        self.history.append(entry)
        if self.guard is not None:
            probe = {"step": step, "fraction": fraction, "metrics": metrics}
            crossing = self.guard.check({"baseline": self.baseline}, probe)
            if crossing is not None:
                entry["guard"] = crossing
        return metrics

    def reset_baseline(self) -> dict[str, Any]:
        """Measure a new baseline (e.g. after loading pretrained weights) and return it."""
        self.baseline = self._summary()
        return self.baseline

    def drift(self, metrics: dict[str, Any] | None = None) -> dict[str, float]:
        """``{metric: delta %}`` of ``metrics`` (default: the last measurement, or a new one if
        there is none) against the baseline, from the layer means as the study defines it."""
        if metrics is None:
            metrics = self.history[-1]["metrics"] if self.history else self.measure()
        return {m: delta_pct(float(metrics["mean"][m]), float(self.baseline["mean"][m]))
                for m in METRICS}


class AttnDriftCallback(TrainerCallback):
    """``transformers.Trainer`` callback measuring attention drift while training.

    Args:
        probe_pixel_values: ``[n, 3, S, S]`` preprocessed probe images (a fixed set: the same
            images at every measurement; a few dozen to 200).
        every_n_steps: measure after every this many optimizer steps, and after the last one.
        layers, batch_size: as for `AttentionMonitor`.
        prefix: prefix of the logged scalar names.
        per_layer: also log ``{prefix}{metric}_L{i}`` for every layer i = 1, 2, ...
        guard: an early-warning `attndrift.guard.Guard` on an attention signal, checked at every
            measurement (its ``start`` against ``global_step / max_steps``); with action
            ``stop`` the callback sets ``control.should_training_stop`` at the first crossing.

    The baseline is measured on ``on_train_begin`` from the Trainer's model. At a measuring
    step the callback asks the Trainer to log (``control.should_log``) and adds its scalars to
    that log entry: to ``trainer.state.log_history`` and to the ``logs`` every later callback
    sees. Reporting integrations (``report_to``) are placed before user callbacks by the
    Trainer; to send the scalars to them too, call ``attach(trainer)`` instead of passing the
    callback in ``callbacks=``. ``history`` (and ``monitor``) stay available after training.
    """

    def __init__(self, probe_pixel_values: torch.Tensor, every_n_steps: int = 50, *,
                 layers: Sequence[int] | None = None, batch_size: int = 64,
                 prefix: str = "attn/", per_layer: bool = True,
                 guard: Guard | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.pixel_values = probe_pixel_values
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.batch_size = batch_size
        self.prefix = prefix
        self.per_layer = per_layer
        self.guard = guard
        self.monitor: AttentionMonitor | None = None
        self._pending: tuple[int, dict[str, float]] | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.monitor.history if self.monitor is not None else []

    @property
    def baseline(self) -> dict[str, Any] | None:
        return self.monitor.baseline if self.monitor is not None else None

    def attach(self, trainer: Any) -> AttnDriftCallback:
        """Register with ``trainer`` as its first callback, so reporting integrations see the
        scalars in their ``on_log``."""
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("AttnDriftCallback needs the Trainer's model in on_train_begin")
        self.monitor = AttentionMonitor(model, self.pixel_values, layers=self.layers,
                                        batch_size=self.batch_size, guard=self.guard)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.monitor is None or not (step % self.every_n_steps == 0
                                        or step == state.max_steps):
            return
        metrics = self.monitor.measure(step, step / state.max_steps if state.max_steps else None)
        scalars = flat_scalars(metrics, self.monitor.history[-1]["drift"], self.prefix,
                               self.per_layer)
        if self.monitor.should_stop:
            control.should_training_stop = True
        self._pending = (step, scalars)
        control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None:
            return
        step, scalars = self._pending
        self._pending = None
        if logs is not None:
            logs.update(scalars)
        # The Trainer appended a copy of `logs` to log_history before calling on_log.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == step:
            last.update(scalars)
        else:
            state.log_history.append({**scalars, "step": step})

    def on_train_end(self, args, state, control, **kwargs):
        if self._pending is not None:  # measured but never logged (should not happen)
            step, scalars = self._pending
            self._pending = None
            state.log_history.append({**scalars, "step": step})
