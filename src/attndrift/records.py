"""The run record: one self-describing JSON per run, the only on-disk format downstream code reads.

Writes are atomic (temp file in the same directory, fsync, os.replace), so a reader sees either
the previous complete record or the new one, never a half-written file; a failed write (full
disk, read-only filesystem) leaves no temp file behind and raises an `OSError` naming the
target. Files get the permissions the umask allows (0644 under the usual 022), as ``open`` would
give them, so a shared store stays readable by colleagues.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile  # noqa: F401 (tests patch records.tempfile.mkstemp, the module's)
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from attndrift import record_check
from attndrift.fileio import (  # noqa: F401 (re-exported: where writers found them)
    atomic_write_bytes,
    file_sha256,
    write_error,
)

SCHEMA_VERSION = 1
RECORD_FILE = "record.json"
TOP_LEVEL_KEYS = ("schema_version", "run_id", "status", "config", "provenance", "baseline",
                  "history", "final", "zeroshot", "timing")
# interrupted: stopped by Ctrl-C or SIGTERM; resumable, like a killed run ("running")
STATUSES = ("running", "completed", "diverged", "failed", "interrupted")


class RecordError(ValueError):
    """A record that is missing, corrupt, half-written or of an unknown schema."""


# --- the record, typed: what `train` and `measure` write (`write_record`) -----------------
# Readers get the JSON form (`read_record`: a dict, checked by `attndrift.record_check`).
# Field order is the on-disk key order. A new section is a new field here (and, if readers
# format it, a check in `record_check`).


@dataclass
class Evaluated:
    """Which weights ``final`` and ``zeroshot`` measured: ``checkpoint`` final (the last
    step's) or best (the best-validation epoch's, restored before the final evaluation:
    ``eval.checkpoint``), and that checkpoint's epoch and step."""

    checkpoint: str
    epoch: int
    step: int


@dataclass
class Final:
    """``record["final"]``: the evaluated model's accuracies, attention and its drift.

    ``val_acc`` is the evaluated checkpoint's validation accuracy (the last epoch's for
    ``final``), ``step``/``epochs`` how long training ran, ``train_loss`` its last logged loss;
    ``metrics`` is `summarize` of the probe subset, ``delta_pct*``, ``subsets`` as
    `attndrift.evaluate.drift_summary`; ``aux`` the auxiliary metrics and ``subset_cv``.
    A measured checkpoint has no training: its step, epochs, best epoch and loss are None."""

    step: int | None
    epochs: float | None
    val_acc: float | None
    best_val_acc: float | None
    best_epoch: int | None
    test_acc: float | None
    train_loss: float | None
    metrics: dict[str, Any]
    delta_pct: dict[str, float | None]
    delta_pct_layers: dict[str, list[float | None]]
    subsets: list[dict[str, float]]
    delta_pct_subset_mean: dict[str, float | None]
    aux: dict[str, Any]
    evaluated: Evaluated | None = None  # absent in records of measured checkpoints

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.evaluated is None:
            del out["evaluated"]
        else:
            out["evaluated"] = asdict(self.evaluated)
        return out


def _history() -> dict[str, list]:
    return {"probes": [], "epochs": [], "loss": []}


@dataclass
class RunRecord:
    """One run's record; ``to_json`` is the on-disk form (schema `SCHEMA_VERSION`).

    ``history`` (probes, epochs, loss), ``baseline`` (`summarize` of the pretrained model plus
    its ``subsets``, ``aux``, ``zeroshot_subset``), ``zeroshot`` (`zeroshot_summary`),
    ``provenance`` and ``timing`` stay plain JSON objects (fields in `TOP_LEVEL_KEYS` order
    on disk); ``final`` is a `Final` once the
    final evaluation ran (``{}`` on disk before). ``sanity``/``warnings`` are written once the
    baseline is measured, ``error``/``traceback`` when a run stops."""

    run_id: str
    config: dict[str, Any]
    status: str = "running"
    provenance: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list] = field(default_factory=_history)
    final: Final | None = None
    zeroshot: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    guard: dict[str, Any] | None = None  # `attndrift.guard` summary, with a guard section
    sanity: dict[str, Any] | None = None
    warnings: list[str] | None = None
    robustness: dict[str, Any] | None = None  # accuracy on corrupted test splits
    error: str | None = None
    traceback: str | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """The record as written: ``TOP_LEVEL_KEYS`` in order, then the optional keys set."""
        out: dict[str, Any] = {}
        for key in (*TOP_LEVEL_KEYS, *_OPTIONAL):
            value = getattr(self, key)
            if key in _OPTIONAL and value is None:
                continue
            out[key] = (value.to_json() if isinstance(value, Final)
                        else {} if key == "final" and value is None else value)
        return out

    # Mapping-style access to the declared fields, so that code written for the JSON form
    # (`attndrift.tracked`, `attndrift.guard`) takes a RunRecord too; ``final`` reads as its
    # JSON form. An undeclared key is a KeyError: a new section is a new field.
    def __getitem__(self, key: str) -> Any:
        if key not in _FIELDS:
            raise KeyError(key)
        value = getattr(self, key)
        return value.to_json() if isinstance(value, Final) else (
            {} if key == "final" and value is None else value)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in _FIELDS:
            raise KeyError(f"{key!r} is not a field of RunRecord; declare it there")
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in _FIELDS and getattr(self, key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self:
            return default
        return self[key]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """A record read back (resume): ``final`` is kept only if it was written."""
        data = dict(data)
        final = data.pop("final", None) or None
        if final is not None:
            final = dict(final)
            evaluated = final.pop("evaluated", None)
            final = Final(**final, evaluated=Evaluated(**evaluated) if evaluated else None)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}, final=final)


_OPTIONAL = ("guard", "sanity", "warnings", "robustness", "error", "traceback")  # on disk when set
_FIELDS = frozenset((*TOP_LEVEL_KEYS, *_OPTIONAL))


def evaluated_checkpoint(record: dict[str, Any]) -> str:
    """Which checkpoint a record's ``final`` measured: ``final`` or ``best`` (records written
    before ``final.evaluated`` existed measured the final weights)."""
    return ((record.get("final") or {}).get("evaluated") or {}).get("checkpoint", "final")


def new_record(run_id: str, config: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of a fresh `RunRecord` (status running)."""
    return RunRecord(run_id, config).to_json()


def config_digest(config: dict[str, Any]) -> str:
    """8 hex of ``config`` as sorted, compact JSON: stable for identical resolved configs."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_id_for(config: dict[str, Any]) -> str:
    """``<name>-<8 hex>``: readable, and stable for identical resolved configs."""
    return f"{config.get('name', 'run')}-{config_digest(config)}"


def jsonable(value: Any) -> Any:
    """``value`` with NaN/inf replaced by None (JSON has neither): a diverged loss is recorded
    as null with the status saying why."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def write_record(path: Path, record: RunRecord | dict[str, Any]) -> None:
    """Write ``record`` (a `RunRecord`, or its JSON form) to ``path`` atomically, NaN/inf as
    null; the one writer of records."""
    if isinstance(record, RunRecord):
        record = record.to_json()
    missing = [k for k in TOP_LEVEL_KEYS if k not in record]
    if missing:
        raise RecordError(f"record lacks {missing}")
    text = json.dumps(jsonable(record), indent=1, allow_nan=False)
    atomic_write_bytes(Path(path), text.encode())


def read_record(path: Path) -> dict[str, Any]:
    """Load and check a record; raises `RecordError` naming the file and the problem."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path}: no record (run never started, or wrong directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(f"{path}: corrupt or half-written record ({err})") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise RecordError(f"{path}: corrupt record (nested too deeply to read)") from None
    except OSError as err:
        raise RecordError(f"{path}: unreadable record ({err.strerror or err})") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path}: corrupt record (not a JSON object)")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise RecordError(f"{path}: schema_version {record.get('schema_version')!r}, "
                          f"this attndrift reads {SCHEMA_VERSION}")
    missing = [k for k in TOP_LEVEL_KEYS if k not in record]
    if missing:
        raise RecordError(f"{path}: corrupt record, missing {', '.join(missing)}")
    if record["status"] not in STATUSES:
        raise RecordError(f"{path}: unknown status {record['status']!r}")
    problem = record_check.problem(record)
    if problem:
        raise RecordError(f"{path}: corrupt record, {problem}")
    return record


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(device: str) -> dict[str, Any]:
    """Versions, machine and code revision; data and model fingerprints are added by the run."""
    import peft
    import torch
    import transformers

    from attndrift._version import __version__

    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"attndrift": __version__, "python": sys.version.split()[0],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "platform": platform.platform(),
            "device": device, "gpu": gpu, "cpu_threads": torch.get_num_threads(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "git_commit": _git_commit()}
