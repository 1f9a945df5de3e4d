"""Plumbing of the training loop: device choice, progress bar, checkpoint files, TensorBoard.

Kept apart from `attndrift.train` so that the loop itself reads top to bottom.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from attndrift.probes.metrics import METRICS, delta_pct
from attndrift.records import RecordError, atomic_write_bytes, jsonable, read_record

RESUME_FILE = "resume.pt"


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


def progress_bar(enabled: bool, total: int, done: int, description: str):
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


def open_board(out_dir: Path, step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("tensorboard=true needs TensorBoard: pip install "
                           "'attndrift[tensorboard]'") from None
    # purge_step drops events a killed run wrote after its last checkpoint
    return SummaryWriter(str(out_dir / "tensorboard"), purge_step=step or None)


def board_metrics(board, metrics: dict[str, Any], baseline: dict[str, Any], step: int) -> None:
    for m in METRICS:
        board.add_scalar(f"attention/{m}", metrics["mean"][m], step)
        board.add_scalar(f"attention/{m}_delta_pct",
                         delta_pct(metrics["mean"][m], baseline["mean"][m]), step)
        for i, value in enumerate(metrics[m]["layers"]):
            board.add_scalar(f"attention_layers/{m}/L{i + 1}", value, step)


def load_resume(out_dir: Path, run_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The saved loop state and record of an interrupted run of the same config, if any."""
    path = out_dir / RESUME_FILE
    if not path.is_file():
        return None
    try:
        record = read_record(out_dir)
    except RecordError:
        return None
    # "running": killed; "failed": crashed or interrupted. A diverged run is not resumed: it
    # would diverge again from its last checkpoint.
    if record["run_id"] != run_id or record["status"] not in ("running", "failed"):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
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
