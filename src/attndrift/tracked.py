"""The signals tracked during training, read from a run record at a probe or at a point of
training: what the predictor ranking (`attndrift.analysis.predictors`), the forecast
(`attndrift.analysis.forecast`) and the guard (`attndrift.guard`) read, all through
`value_at_probe`.

A signal is one number per probe: the layer-mean drift of entropy, ERF, Gini and head diversity
(signed and absolute, 002 §3.2 eq. 2 on the probe set), the last layer's Δ entropy, CKA to the
pretrained model (CLS token, layer mean and last layer), embedding drift, relative weight drift,
training loss, validation accuracy, zero-shot retention on the fixed subset of a transfer task
(the later protocol's 1,000-image track), log10 lr and (at the end only) test accuracy: the
later protocol's predictor list. ``more_change`` names the direction that means more change from
the pretrained model (signed drifts: the direction of collapse, lower entropy / ERF / head
diversity, higher Gini). Torch-free: reads records only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]
Probe = dict[str, Any]


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _drift(adapted: Any, pretrained: Any) -> float:
    """100 (adapted - pretrained) / pretrained (002 §3.2 eq. 2); NaN when undefined."""
    a, b = _num(adapted), _num(pretrained)
    return 100.0 * (a - b) / b if math.isfinite(a) and math.isfinite(b) and b != 0 else math.nan


def _mean_drift(metric: str, absolute: bool) -> Callable[[Record, Probe, str | None], float]:
    def read(record: Record, probe: Probe, task: str | None) -> float:
        base = ((record.get("baseline") or {}).get("mean") or {}).get(metric)
        value = _drift(((probe.get("metrics") or {}).get("mean") or {}).get(metric), base)
        return abs(value) if absolute else value
    return read


def _last_layer_drift(absolute: bool) -> Callable[[Record, Probe, str | None], float]:
    def read(record: Record, probe: Probe, task: str | None) -> float:
        base = ((record.get("baseline") or {}).get("entropy") or {}).get("layers") or []
        now = ((probe.get("metrics") or {}).get("entropy") or {}).get("layers") or []
        if not base or len(now) != len(base):
            return math.nan
        value = _drift(now[-1], base[-1])
        return abs(value) if absolute else value
    return read


def _cka(which: str) -> Callable[[Record, Probe, str | None], float]:
    def read(record: Record, probe: Probe, task: str | None) -> float:
        layers = [_num(v) for v in (probe.get("aux") or {}).get("cka_cls") or []]
        if not layers:
            return math.nan
        return sum(layers) / len(layers) if which == "mean" else layers[-1]
    return read


def _aux(key: str) -> Callable[[Record, Probe, str | None], float]:
    def read(record: Record, probe: Probe, task: str | None) -> float:
        return _num((probe.get("aux") or {}).get(key))
    return read


def _before(entries: list[dict[str, Any]], step: Any, key: str) -> float:
    """``key`` of the last entry logged at or before ``step``."""
    step = _num(step)
    for entry in reversed(entries or []):
        if _num(entry.get("step")) <= step:
            return _num(entry.get(key))
    return math.nan


def _loss(record: Record, probe: Probe, task: str | None) -> float:
    return _before((record.get("history") or {}).get("loss"), probe.get("step"), "loss")


def _val_acc(record: Record, probe: Probe, task: str | None) -> float:
    return _before((record.get("history") or {}).get("epochs"), probe.get("step"), "val_acc")


def _zeroshot_track(record: Record, probe: Probe, task: str | None) -> float:
    """Retention % on the task's fixed subset; with no task, the lowest over the tasks."""
    base = (record.get("baseline") or {}).get("zeroshot_subset") or {}
    now = probe.get("zeroshot") or {}
    tasks = [task] if task is not None else sorted(now)
    values = [100.0 * _num(now.get(t)) / _num(base.get(t)) for t in tasks
              if t in now and _num(base.get(t)) > 0]
    values = [v for v in values if math.isfinite(v)]
    return min(values) if values else math.nan


def _log_lr(record: Record, probe: Probe, task: str | None) -> float:
    lr = _num(((record.get("config") or {}).get("train") or {}).get("lr"))
    return math.log10(lr) if lr > 0 else math.nan


def _test_acc(record: Record, probe: Probe, task: str | None) -> float:
    return _num(probe.get("test_acc"))  # only the end point (`end_probe`) carries it


@dataclass(frozen=True)
class Signal:
    """A tracked signal: ``read(record, probe, task)`` gives its value at a probe (NaN when the
    probe did not measure it); ``needs`` says what the run must measure during training."""

    name: str
    label: str
    unit: str
    more_change: str  # "higher" | "lower": the direction that means more change
    read: Callable[[Record, Probe, str | None], float]
    needs: str = "attention"  # attention | cka | drift | zeroshot | loss | epochs | config | end


_ATTN = (("entropy", "entropy"), ("erf", "ERF"), ("gini", "Gini"),
         ("head_diversity", "head div."))
_COLLAPSE = {"entropy": "lower", "erf": "lower", "gini": "higher", "head_diversity": "lower"}

SIGNALS: dict[str, Signal] = {s.name: s for s in (
    *(Signal(f"abs_d_{m}", f"|Δ {label}|", "%", "higher", _mean_drift(m, True))
      for m, label in _ATTN),
    *(Signal(f"d_{m}", f"Δ {label}", "%", _COLLAPSE[m], _mean_drift(m, False))
      for m, label in _ATTN),
    Signal("abs_d_entropy_last", "|Δ entropy|, last layer", "%", "higher",
           _last_layer_drift(True)),
    Signal("d_entropy_last", "Δ entropy, last layer", "%", "lower", _last_layer_drift(False)),
    Signal("cka_mean", "CKA to pretrained (mean)", "", "lower", _cka("mean"), "cka"),
    Signal("cka_last", "CKA to pretrained (last layer)", "", "lower", _cka("last"), "cka"),
    Signal("embedding_drift", "embedding drift", "", "higher", _aux("embedding_drift"), "drift"),
    Signal("weight_drift", "relative weight drift", "", "higher", _aux("weight_drift"), "drift"),
    Signal("train_loss", "training loss", "nats", "lower", _loss, "loss"),
    Signal("val_acc", "validation accuracy", "", "higher", _val_acc, "epochs"),
    Signal("zeroshot_track", "zero-shot track retention", "%", "lower", _zeroshot_track,
           "zeroshot"),
    Signal("log_lr", "log10 lr", "", "higher", _log_lr, "config"),
    Signal("test_acc", "test accuracy", "", "higher", _test_acc, "end"),
)}


def signal(name: str) -> Signal:
    if name not in SIGNALS:
        raise ValueError(f"unknown signal {name!r}; known signals: {', '.join(SIGNALS)}")
    return SIGNALS[name]


def change(sig: Signal, value: float) -> float:
    """``value`` oriented so that larger means more change (for picking the least-changed)."""
    return value if sig.more_change == "higher" else -value


def probes(record: Record) -> list[Probe]:
    return list((record.get("history") or {}).get("probes") or [])


def end_probe(record: Record) -> Probe:
    """The end of training as one probe: the last probe, with the final auxiliary metrics
    (measured on the same probe images after the last step) and the test accuracy."""
    history = probes(record)
    last = dict(history[-1]) if history else {}
    final = record.get("final") or {}
    last["aux"] = {**(last.get("aux") or {}), **(final.get("aux") or {})}
    last["test_acc"] = final.get("test_acc")
    if "step" not in last:
        last["step"] = final.get("step")
    return last


def value_at_probe(record: Record, name: str, probe: Probe, task: str | None = None) -> float:
    try:
        return float(SIGNALS[name].read(record, probe, task))
    except (TypeError, ValueError, ZeroDivisionError, KeyError, IndexError):
        return math.nan


def value_at(record: Record, name: str, point: tuple[str, float], task: str | None = None
             ) -> float:
    """The signal at a point of training: ``("end", 1)``, ``("epoch", e)`` or ``("fraction",
    f)``: its last value measured at or before the point, after the start (NaN if none)."""
    kind, at = point
    if kind == "end":
        return value_at_probe(record, name, end_probe(record), task)
    key = "epoch" if kind == "epoch" else "fraction"
    for probe in reversed(probes(record)):
        where = _num(probe.get(key))
        if 0 < where <= at + 1e-9:
            value = value_at_probe(record, name, probe, task)
            if math.isfinite(value):
                return value
    return math.nan
