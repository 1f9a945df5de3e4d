"""Experiment trackers: a run's scalars to TensorBoard, Weights & Biases and MLflow.

One registry (`TRACKERS`, one entry per tracker: its pip extra and how it opens). The train
loop writes every scalar once, through `Trackers.scalar`, so every tracker a run names
(config ``trackers``; ``tensorboard: true`` is the same as naming tensorboard) receives the same
tags at the same optimizer steps:

- ``train/loss``, ``train/lr``, ``train/reg`` at every log,
- ``attention/<metric>``, ``attention/<metric>_delta_pct``, ``attention_layers/<metric>/L<i>``
  and ``zeroshot_subset/<task>`` at every probe, ``val/accuracy`` at every epoch end,
- at the end: the final attention metrics, ``zeroshot/<task>`` and ``test/accuracy``.

A tracker whose package is not installed is skipped: one warning naming the extra to install,
the same line in the record's ``warnings``, and the run goes on. Where each one writes:
TensorBoard to ``OUT/tensorboard``; W&B to the project ``$WANDB_PROJECT`` (default attndrift)
with local files in ``OUT/wandb`` (``WANDB_MODE=offline`` works without an account); MLflow to
``$MLFLOW_TRACKING_URI`` (MLflow's own default without it), experiment
``$MLFLOW_EXPERIMENT_NAME`` (default attndrift). A resumed run continues its W&B and MLflow runs
(their ids derive from the run id and its directory). Torch-free but for TensorBoard's writer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from attndrift.fields import dotted

__all__ = ["TRACKERS", "Trackers", "open_trackers", "tracker_names"]


class Writer(Protocol):
    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def close(self, status: str) -> None: ...


@dataclass(frozen=True)
class Opening:
    """What a tracker is told when a run opens it."""

    out_dir: Path
    run_id: str
    name: str  # the config's name (the run id where it has none)
    step: int  # the step the run starts (or resumes) at
    config: Mapping[str, Any]  # the resolved config, as JSON

    @property
    def key(self) -> str:
        """The tracker-side run id: one per run id and directory, so a resume continues it."""
        where = hashlib.sha1(str(self.out_dir.resolve()).encode()).hexdigest()[:8]
        return f"{self.run_id}-{where}"


@dataclass(frozen=True)
class TrackerSpec:
    name: str
    module: str  # the package whose presence decides whether it can run
    extra: str  # the attndrift extra that installs it
    open: Callable[[Opening], Writer]


class _TensorBoard:
    def __init__(self, at: Opening):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after its last checkpoint
        self.writer = SummaryWriter(str(at.out_dir / "tensorboard"), purge_step=at.step or None)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, at: Opening):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "attndrift"),
                              name=at.name, id=at.key, resume="allow", dir=str(at.out_dir),
                              config=dict(at.config), reinit="create_new")

    def scalar(self, tag: str, value: float, step: int) -> None:
        # W&B drops a step lower than one it has (a resume's replayed steps), with a warning
        self.run.log({tag: value}, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


class _MLflow:
    """Metrics are sent in one batch per step (one request per step to a tracking server)."""

    def __init__(self, at: Opening):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "attndrift")
        found = client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else client.create_experiment(name)
        tag = f"tags.`attndrift.key` = '{at.key}'"
        runs = client.search_runs([experiment], filter_string=tag, max_results=1)
        if runs:  # a resumed run continues its MLflow run
            self.run_id = runs[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = client.create_run(
                experiment, run_name=at.name,
                tags={"attndrift.key": at.key, "attndrift.run_id": at.run_id}).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in dotted(at.config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                client.log_batch(self.run_id, params=params[i:i + 100])
        self.pending: list[Any] = []

    def scalar(self, tag: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        if self.pending and self.pending[-1].step != step:
            self._flush()
        self.pending.append(Metric(tag, value, int(time.time() * 1000), step))

    def _flush(self) -> None:
        for i in range(0, len(self.pending), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
        self.pending = []

    def close(self, status: str) -> None:
        self._flush()
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED",
                                                        "killed": "KILLED"}.get(status, "FAILED"))


TRACKERS: dict[str, TrackerSpec] = {
    "tensorboard": TrackerSpec("tensorboard", "tensorboard", "tensorboard", _TensorBoard),
    "wandb": TrackerSpec("wandb", "wandb", "wandb", _WandB),
    "mlflow": TrackerSpec("mlflow", "mlflow", "mlflow", _MLflow),
}


def tracker_names(names: list[str], tensorboard: bool = False) -> list[str]:
    """The trackers a config names (``tensorboard: true`` adds tensorboard), each once;
    an unknown name is a ValueError naming the known ones."""
    for n in names:
        if n not in TRACKERS:
            raise ValueError(f"unknown tracker {n!r}; known: {', '.join(TRACKERS)}")
    return list(dict.fromkeys([*names, *(["tensorboard"] if tensorboard else [])]))


class Trackers:
    """The open trackers of a run, written to as one; false when there are none."""

    def __init__(self, writers: list[Writer]):
        self.writers = writers

    def __bool__(self) -> bool:
        return bool(self.writers)

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return  # a drift from 0 has no size (`signals.drift_pct`): nothing to plot
        for w in self.writers:
            w.scalar(tag, float(value), step)

    def close(self, status: str = "finished") -> None:
        """``status``: finished, failed or killed (an interrupted run, resumable)."""
        for w in self.writers:
            w.close(status)
        self.writers = []


def open_trackers(names: list[str], at: Opening,
                  warn: Callable[[str], None] | None = None) -> Trackers:
    """Open the named trackers; one whose package is missing is skipped with one line to
    ``warn`` (default: `warnings.warn`) that names the extra to install."""
    writers = []
    for name in names:
        spec = TRACKERS[name]
        if importlib.util.find_spec(spec.module) is None:
            line = (f"tracker {name} is not installed, so this run logs nothing to it; "
                    f"pip install -e '.[{spec.extra}]' to use it")
            (warn or (lambda m: warnings.warn(m, stacklevel=3)))(line)
            continue
        writers.append(spec.open(at))
    return Trackers(writers)
