"""Plumbing of the training loop: device choice, progress bar, checkpoint files, TensorBoard.

Kept apart from `attndrift.train` so that the loop itself reads top to bottom.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from attndrift.probes.metrics import METRICS, delta_pct
from attndrift.records import RecordError, atomic_write_bytes, jsonable, read_record

RESUME_FILE = "resume.pt"
RESUMABLE = ("running", "failed", "interrupted")  # killed, crashed, Ctrl-C / SIGTERM
# set by the CLI when stderr is not a terminal: the disabled progress bar prints a line per
# epoch and per loss log point instead (log files, nohup, CI)
log_lines = False


def say(message: str) -> None:
    """One line on stderr (what a library tells a user who would otherwise be left guessing)."""
    print(message, file=sys.stderr, flush=True)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: taskset, cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def torch_threads(workers: int = 1, threads: int | None = None, *,
                  env: dict[str, str] | None = None, cores: int | None = None) -> int | None:
    """Torch CPU threads for each run when ``workers`` runs share this machine; None leaves
    torch's default. The first that is set wins: ``threads`` (``--threads``),
    ``$ATTNDRIFT_THREADS``, ``$OMP_NUM_THREADS`` (each a count per run process), else
    ``max(1, cores // workers)`` with several workers, so together they use each core once.
    Raises `ValueError` (one line) for a count that is not a positive integer."""
    env = os.environ if env is None else env
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads}: give a positive integer")
        return threads
    for key in ("ATTNDRIFT_THREADS", "OMP_NUM_THREADS"):
        value = env.get(key, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{key}={value}: give a positive integer (threads per run)")
            return int(value)
    if workers > 1:
        return max(1, (usable_cores() if cores is None else cores) // workers)
    return None


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} requested but CUDA is not available; use device=cpu")
    return torch.device(name)


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.cpu().contiguous() for k, v in state.items()},
                                  metadata=metadata))


class LineProgress:
    """The progress bar's interface, printing plain lines instead of a live bar: one per epoch
    end (``info`` "val ..."), and a loss line when the last line is ``every_s`` old."""

    def __init__(self, total: int, done: int, description: str, every_s: float = 30.0) -> None:
        self.total, self.done, self.description = total, done, description
        self.t0 = self.last = time.monotonic()
        self.every_s = every_s

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def advance(self, _task: int, amount: int = 1) -> None:
        self.done += amount

    def update(self, _task: int, info: str = "", **_kw) -> None:
        epoch_end = info.startswith("val")  # set after the step's advance; loss lines before
        now = time.monotonic()
        if epoch_end or now - self.last >= self.every_s:
            step = self.done if epoch_end else self.done + 1
            say(f"{self.description}: step {step}/{self.total}, {info}, {now - self.t0:.0f}s")
            self.last = now


def progress_bar(enabled: bool, total: int, done: int, description: str):
    if not enabled and log_lines:
        bar = LineProgress(total, done, description)
        return bar, 0
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                   console=Console(stderr=True), disable=not enabled)
    return bar, bar.add_task(description, total=total, completed=done, info="")


def board_metrics(board, metrics: dict[str, Any], baseline: dict[str, Any], step: int) -> None:
    """The attention metrics of a probe to the run's trackers (`attndrift.trackers`)."""
    for m in METRICS:
        board.scalar(f"attention/{m}", metrics["mean"][m], step)
        board.scalar(f"attention/{m}_delta_pct",
                     delta_pct(metrics["mean"][m], baseline["mean"][m]), step)
        for i, value in enumerate(metrics[m]["layers"]):
            board.scalar(f"attention_layers/{m}/L{i + 1}", value, step)


@dataclass
class LoopState:
    """Everything the training loop changes as it goes. ``resume.pt`` holds exactly these
    fields (`saved`: tensors on the CPU, generators as their states), the states of the
    set-up's objects named in `OBJECT_KEYS`, and the record as of then."""

    # where the loop is: optimizer steps, completed epochs, batch within the epoch, its order
    step: int
    epoch: int
    batch: int
    perm: torch.Tensor
    # training loss (and penalty) summed on the device since the last log, over loss_count
    loss_sum: torch.Tensor
    reg_sum: torch.Tensor
    loss_count: int
    best_val: float  # best validation accuracy so far (-1: none yet), and its epoch
    best_epoch: int
    # seconds spent training, probing, in zero-shot and auxiliary passes
    train_s: float
    probe_s: float
    zeroshot_s: float
    aux_s: float
    # measured before training: auxiliary reference features, zero-shot accuracies, the
    # attention samples saved with the final ones
    aux_ref: dict[str, Any]
    zs_before: dict[str, float]
    base_attn: torch.Tensor
    # the data order and flip streams (seeded by the run's seed)
    order_gen: torch.Generator
    flip_gen: torch.Generator
    history: dict[str, list]  # the record's history: probes, epoch ends, loss logs

    def saved(self, objects: dict[str, Any]) -> dict[str, Any]:
        """What ``resume.pt`` holds: every field, plus ``objects`` (`OBJECT_KEYS`)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(order_gen=self.order_gen.get_state(), flip_gen=self.flip_gen.get_state(),
                   loss_sum=self.loss_sum.detach().cpu(), reg_sum=self.reg_sum.detach().cpu())
        return {**out, **objects}

    @classmethod
    def restored(cls, saved: dict[str, Any], device: torch.device, seed: int) -> LoopState:
        """The state a `saved` dict was made from, accumulators back on ``device``."""
        values = {f.name: saved[f.name] for f in fields(cls)}
        values["order_gen"], values["flip_gen"] = generators(seed)
        values["order_gen"].set_state(saved["order_gen"])
        values["flip_gen"].set_state(saved["flip_gen"])
        values["loss_sum"] = saved["loss_sum"].to(device)
        values["reg_sum"] = saved["reg_sum"].to(device)
        return cls(**values)


def generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """The data order and flip generators of a run seeded ``seed``."""
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)


# the states of the set-up's objects in resume.pt besides `LoopState` (cuda_rng on CUDA,
# scaler with fp16 only)
OBJECT_KEYS = ("model", "optimizer", "scheduler", "torch_rng")
# what every resume state holds; one without them is treated as corrupt
RESUME_KEYS = (*(f.name for f in fields(LoopState)), *OBJECT_KEYS)


class BestWeights:
    """The best validation epoch's trainable weights: kept in host memory when an epoch
    improves, written to ``best.safetensors`` at the next checkpoint and at the end, and
    read back from there after a resume."""

    FILE = "best.safetensors"

    def __init__(self, out_dir: Path, meta: dict[str, str]) -> None:
        self.path, self.meta = out_dir / self.FILE, meta
        self.state: dict[str, torch.Tensor] | None = None
        self.epoch: int | None = None
        self.pending = False  # in memory, not yet on disk

    def keep(self, state: dict[str, torch.Tensor], epoch: int) -> None:
        self.state, self.epoch, self.pending = state, epoch, True

    def write(self) -> None:
        if self.pending:
            save_weights(self.path, self.state, {**self.meta, "epoch": str(self.epoch)})
            self.pending = False

    def weights(self, epoch: int) -> dict[str, torch.Tensor]:
        """The weights of ``epoch``, from memory or (after a resume) from the file; raises
        `RuntimeError` when the file holds another epoch or is missing."""
        if self.state is not None and self.epoch == epoch:
            return self.state
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not self.path.is_file():
            raise RuntimeError(f"{self.path} is missing: the best epoch's weights are needed "
                               "for eval.checkpoint=best; rerun with --force")
        with safe_open(self.path, "pt") as fh:
            saved = (fh.metadata() or {}).get("epoch")
        if saved != str(epoch):
            raise RuntimeError(f"{self.path} holds epoch {saved}, the run's best is {epoch}; "
                               "rerun with --force")
        return load_file(self.path)


class OutDirTaken(ValueError):
    """The run directory holds a completed run of another config."""


def completed_record(out_dir: Path, run_id: str, *, force: bool = False) -> dict[str, Any] | None:
    """The completed record of run ``run_id`` in ``out_dir``, if there is one (nothing to do).

    Raises `OutDirTaken` when ``out_dir`` holds a completed run of another config, unless
    ``force``: a finished run is never overwritten by accident. Unfinished runs of another
    config are replaced (their record says they did not finish)."""
    try:
        record = read_record(out_dir)
    except RecordError:
        return None
    if record["status"] != "completed":
        return None
    if record["run_id"] == run_id:
        return record
    if force:
        return None
    raise OutDirTaken(f"{out_dir} holds the completed run {record['run_id']} of another config "
                      f"(this one is {run_id}); choose another --out, or pass --force to "
                      "replace it")


def set_aside(path: Path, why: str) -> Path:
    """Rename a corrupt ``path`` to ``path.corrupt-<time>`` (kept for inspection, never read
    again) and say so in one line."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(aside)
    say(f"warning: {path} is corrupt ({why}); moved it to {aside.name} and starting the run "
        "from scratch")
    return aside


def load_resume(out_dir: Path, run_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The saved loop state and record of an interrupted run of the same config, if any.

    A ``resume.pt`` that does not load (truncated, overwritten, not a torch file) or lacks the
    loop's keys is moved aside (`set_aside`) and the run starts from scratch: its state is
    only read with ``weights_only=True``, never unpickled."""
    path = out_dir / RESUME_FILE
    if not path.is_file():
        return None
    try:
        record = read_record(out_dir)
    except RecordError:
        return None
    # A diverged run is not resumed: it would diverge again from its last checkpoint.
    if record["run_id"] != run_id or record["status"] not in RESUMABLE:
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/pickle/zip raise many types for a bad file
        first = (str(err).splitlines() or [""])[0][:120]
        # torch's own message advises weights_only=False: never pass that advice on
        set_aside(path, type(err).__name__ + ("" if not first or "weights_only" in first
                                              else f": {first}"))
        return None
    missing = [k for k in RESUME_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        set_aside(path, f"no {', '.join(missing)}")
        return None
    if "record" in state:
        # The record as of the checkpoint: record.json may be older (a kill between the two
        # writes) or carry a failed attempt's error. Only the attempt counters are newer there.
        snapshot = json.loads(state.pop("record"))
        for key in ("resumed", "total_s"):
            if key in record["timing"]:
                snapshot["timing"][key] = max(record["timing"][key],
                                              snapshot["timing"].get(key, 0))
        record = snapshot
    record["history"] = state["history"]  # the partial history goes on from the checkpoint
    return state, record


def save_resume(out_dir: Path, state: dict[str, Any], record: dict[str, Any]) -> None:
    """Write the loop's state and the record as of now atomically (torch.save; read back with
    weights_only=True), so that ``resume.pt`` alone is enough to go on, whatever
    ``record.json`` holds. The record goes in as JSON text, less its history: the state holds
    that."""
    rest = {k: v for k, v in record.items() if k != "history"}
    buffer = io.BytesIO()
    torch.save({**state, "record": json.dumps(jsonable(rest), allow_nan=False)}, buffer)
    atomic_write_bytes(out_dir / RESUME_FILE, buffer.getvalue())
