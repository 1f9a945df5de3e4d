"""The signals tracked during training, read from a run record at a probe or at a point of
training: what the predictor ranking (`attndrift.analysis.predictors`), the forecast
(`attndrift.analysis.forecast`) and the guard (`attndrift.guard`) read, all through
`value_at_probe`.

A signal is one number per probe; which signals exist, their labels, units, directions and
readers are declared once in `attndrift.signals` (its `PREDICTORS`: the later protocol's
predictor list plus every attention metric's drift). ``more_change`` names the direction that
means more change from the pretrained model (signed drifts: the direction of collapse, lower
entropy / ERF / head diversity, higher Gini). This module adds reading a signal at a point of
training. Torch-free: reads records only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attndrift import signals as spec

Record = dict[str, Any]
Probe = dict[str, Any]


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


@dataclass(frozen=True)
class Signal:
    """A tracked signal: ``read(record, probe, task)`` gives its value at a probe (NaN when the
    probe did not measure it); ``needs`` says what the run must measure during training. Built
    from the one declaration in `attndrift.signals` (label, unit, direction, reader)."""

    name: str
    label: str
    unit: str
    more_change: str  # "higher" | "lower": the direction that means more change
    read: Callable[[Record, Probe, str | None], float]
    needs: str = "attention"  # attention | cka | drift | zeroshot | loss | epochs | config | end


def _from_spec(name: str) -> Signal:
    s = spec.SIGNALS[name]
    return Signal(name, s.label, s.unit, s.change or "higher",
                  lambda record, probe, task: spec.read_signal(record, probe, name, task),
                  s.needs)


SIGNALS: dict[str, Signal] = {n: _from_spec(n) for n in spec.PREDICTORS}


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
    return spec.final_probe(record)


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
