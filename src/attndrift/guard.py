"""Early-warning guard: act on a tracked signal while a model trains.

A `Guard` watches one signal (`attndrift.tracked.SIGNALS`) at every probe. When the signal has
crossed its threshold in the direction of more change (``above`` / ``below``; by default the
signal's own ``more_change``), from ``start`` (a share of training) on, it records a crossing
and either warns (``action: warn``: training goes on, every crossing is recorded) or asks the
loop to stop (``action: stop``: the first crossing ends training; the run then finishes its
final evaluation and checkpoints as usual, and its record says which signal crossed what,
when). The train loop (`attndrift.train`), `AttentionMonitor` and `AttnDriftCallback` use the
same class. Torch-free.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from attndrift.tracked import SIGNALS, Record, Signal, signal, value_at_probe

ACTIONS = ("warn", "stop")
# What each signal needs the run to measure during training (``Signal.needs``), as config.
_NEEDS = {
    "cka": "probe.aux_every > 0 with 'cka' in probe.aux",
    "drift": "probe.aux_every > 0 with 'drift' in probe.aux",
    "zeroshot": "probe.zeroshot_every > 0",
}


class GuardConfig(BaseModel):
    """The run config's ``guard`` section (documented in docs/config.md)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    signal: str | None = Field(
        None, description="early-warning guard: the tracked signal watched at every probe, one "
        f"of {', '.join(n for n, s in SIGNALS.items() if s.needs != 'end')} (`attndrift."
        "tracked`; cka_* need probe.aux_every with cka, *_drift with drift, zeroshot_track "
        "probe.zeroshot_every); null: no guard")
    threshold: float | None = Field(None, description="the value whose crossing triggers it")
    direction: Literal["auto", "above", "below"] = Field(
        "auto", description="crossing = going above / below the threshold (auto: the signal's "
                            "direction of more change)")
    start: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="share of training before which it does not check")
    action: Literal["warn", "stop"] = Field(
        "warn", description="warn: record and warn, keep training; stop: end training at the "
                            "first crossing (final evaluation and checkpoints as usual)")
    task: str | None = Field(None, description="zeroshot_track: the transfer task (null: the "
                                               "lowest retention over the tracked tasks)")

    @model_validator(mode="after")
    def _known(self) -> GuardConfig:
        if self.signal is not None:
            sig = signal(self.signal)
            if sig.needs == "end":
                raise ValueError(f"guard.signal={self.signal} exists only at the end of "
                                 "training; guard a signal measured during training")
            if self.threshold is None:
                raise ValueError(f"guard.signal={self.signal} needs guard.threshold")
        elif self.threshold is not None:
            raise ValueError("guard.threshold is set but guard.signal is not")
        return self


def auto_direction(sig: Signal) -> str:
    """``direction: auto``: a crossing is a move in the signal's direction of more change."""
    return "above" if sig.more_change == "higher" else "below"


@dataclass
class Guard:
    """Watches ``signal`` against ``threshold``. ``direction``: ``above`` / ``below`` / None
    (the signal's direction of more change); ``start``: share of training before which it does
    not check; ``action``: ``warn`` or ``stop``; ``task``: for ``zeroshot_track``, the transfer
    task (None: the lowest retention over the tracked tasks)."""

    signal: str
    threshold: float
    action: str = "warn"
    start: float = 0.0
    direction: str | None = None
    task: str | None = None
    crossings: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        sig = signal(self.signal)  # unknown names fail here, with the known ones listed
        if sig.needs == "end":
            raise ValueError(f"signal {self.signal} exists only at the end of training; a guard "
                             "needs one measured during training")
        if self.action not in ACTIONS:
            raise ValueError(f"guard action must be warn or stop, not {self.action!r}")
        if self.direction is None:
            self.direction = auto_direction(sig)
        if self.direction not in ("above", "below"):
            raise ValueError(f"guard direction must be above or below, not {self.direction!r}")
        if not math.isfinite(self.threshold):
            raise ValueError("guard threshold must be a finite number")

    @property
    def stopped(self) -> dict[str, Any] | None:
        """The crossing that stopped training (action stop), else None."""
        return self.crossings[0] if self.action == "stop" and self.crossings else None

    @property
    def should_stop(self) -> bool:
        return self.stopped is not None

    def crossed(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value > self.threshold if self.direction == "above" else value < self.threshold

    def check(self, record: Record, probe: dict[str, Any]) -> dict[str, Any] | None:
        """Evaluate at one probe (``step``, ``epoch``, ``fraction`` and what it measured, read
        against ``record``'s baseline and history). Returns the crossing, or None."""
        if self.should_stop:
            return None
        fraction = float(probe.get("fraction") if probe.get("fraction") is not None else 1.0)
        if fraction < self.start - 1e-9:
            return None
        value = value_at_probe(record, self.signal, probe, self.task)
        if not self.crossed(value):
            return None
        event = {"signal": self.signal, "value": value, "threshold": self.threshold,
                 "direction": self.direction, "step": probe.get("step"),
                 "epoch": probe.get("epoch"), "fraction": probe.get("fraction"),
                 "action": self.action}
        self.crossings.append(event)
        if self.action == "warn":
            warnings.warn(describe(event), stacklevel=2)
        return event

    def summary(self) -> dict[str, Any]:
        """What a run record keeps under ``guard``."""
        return {"signal": self.signal, "task": self.task, "threshold": self.threshold,
                "direction": self.direction, "start": self.start, "action": self.action,
                "crossings": list(self.crossings), "stopped": self.stopped}


def describe(event: dict[str, Any]) -> str:
    """One line: which signal crossed what, when."""
    sig = SIGNALS[event["signal"]]
    how = "above" if event["direction"] == "above" else "below"
    when = f"step {event['step']}"
    if event.get("epoch") is not None:
        when += f" (epoch {float(event['epoch']):.2f}"
        when += f", {float(event['fraction']):.0%} of training)" if event.get(
            "fraction") is not None else ")"
    verb = "stopped training" if event["action"] == "stop" else "warning"
    return (f"guard {verb}: {sig.label} = {event['value']:.4g} went {how} "
            f"{event['threshold']:g} at {when}")


def from_config(cfg: Any) -> Guard | None:
    """The guard of a run config's ``guard`` section (None when no signal is set)."""
    section = getattr(cfg, "guard", None)
    if section is None or section.signal is None:
        return None
    return Guard(section.signal, section.threshold, section.action, section.start,
                 None if section.direction == "auto" else section.direction, section.task)


def check_measured(name: str, aux: list[str], aux_every: int, zeroshot_every: int) -> None:
    """Raise ValueError when the run would never measure ``name`` during training."""
    needs = signal(name).needs
    missing = ((needs in ("cka", "drift") and (aux_every == 0 or needs not in aux))
               or (needs == "zeroshot" and zeroshot_every == 0))
    if missing:
        raise ValueError(f"guard.signal={name} is measured during training only with "
                         f"{_NEEDS[needs]}; set it, or guard another signal")


def for_run(cfg: Any, record: Record) -> Guard | None:
    """The train loop's guard: built from ``cfg.guard``, its crossings restored from a resumed
    ``record`` (so a run stopped by its guard never trains past it when resumed), and its
    summary kept in ``record["guard"]``."""
    guard = from_config(cfg)
    if guard is not None:
        guard.crossings = list((record.get("guard") or {}).get("crossings") or [])
        record["guard"] = guard.summary()
    return guard


def at_probe(guard: Guard | None, record: Record, probe: dict[str, Any]) -> bool:
    """Check ``probe`` (already in the record's history); update ``record["guard"]``. Returns
    whether training must stop."""
    if guard is None:
        return False
    if guard.check(record, probe) is not None:
        record["guard"] = guard.summary()
    return guard.should_stop
