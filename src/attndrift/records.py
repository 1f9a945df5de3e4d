"""The run record: one self-describing JSON per run, the only on-disk format downstream code reads.

Writes are atomic (temp file in the same directory, fsync, os.replace), so a reader sees either
the previous complete record or the new one, never a half-written file; a failed write (full
disk, read-only filesystem) leaves no temp file behind and raises an `OSError` naming the
target. Files get the permissions the umask allows (0644 under the usual 022), as ``open`` would
give them, so a shared store stays readable by colleagues.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RECORD_FILE = "record.json"
TOP_LEVEL_KEYS = ("schema_version", "run_id", "status", "config", "provenance", "baseline",
                  "history", "final", "zeroshot", "timing")
# interrupted: stopped by Ctrl-C or SIGTERM; resumable, like a killed run ("running")
STATUSES = ("running", "completed", "diverged", "failed", "interrupted")


class RecordError(ValueError):
    """A record that is missing, corrupt, half-written or of an unknown schema."""


def new_record(run_id: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "run_id": run_id, "status": "running",
            "config": config, "provenance": {}, "baseline": {},
            "history": {"probes": [], "epochs": [], "loss": []}, "final": {},
            "zeroshot": {}, "timing": {}}


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


def _umask() -> int:
    """The process umask, read without changing it where the OS tells (Linux /proc)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(err: OSError, path: Path) -> OSError:
    """``err`` as an `OSError` naming ``path`` (the file meant, not a temp file) and the cause:
    ``str()`` reads ``[Errno 28] No space left on device: 'runs/x/record.json'``."""
    return OSError(err.errno, err.strerror or str(err), str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; respect the umask
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(err, OSError):
            raise write_error(err, path) from None
        raise


def write_record(path: Path, record: dict[str, Any]) -> None:
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
    problem = _type_problem(record)
    if problem:
        raise RecordError(f"{path}: corrupt record, {problem}")
    return record


_NUMBER = (int, float, type(None))
# fields of "final" and of each "zeroshot" task that readers format as numbers
_FINAL_NUMBERS = ("step", "epochs", "val_acc", "best_val_acc", "best_epoch", "test_acc",
                  "train_loss")
_ZEROSHOT_NUMBERS = ("before", "after", "retention_pct", "chance", "classes")


def _type_problem(record: dict[str, Any]) -> str | None:
    """The first field of ``record`` whose type downstream readers could not use, described;
    None if all are usable. Checks the structure every reader relies on, not every value."""
    def kind(value: Any) -> str:
        return type(value).__name__

    for key in ("run_id", "status"):
        if not isinstance(record[key], str):
            return f"{key} is {kind(record[key])}, not a string"
    for key in ("config", "provenance", "baseline", "history", "final", "zeroshot", "timing"):
        if not isinstance(record[key], dict):
            return f"{key} is {kind(record[key])} {record[key]!r:.40}, not an object"
    final = record["final"]
    for key in _FINAL_NUMBERS:
        value = final.get(key)
        if isinstance(value, bool) or not isinstance(value, _NUMBER):
            return f"final.{key} is {kind(value)} {value!r:.40}, not a number"
    for key in ("metrics", "delta_pct", "delta_pct_layers", "aux"):
        if key in final and not isinstance(final[key], dict):
            return f"final.{key} is {kind(final[key])}, not an object"
    for key, value in final.get("delta_pct", {}).items():
        if isinstance(value, bool) or not isinstance(value, _NUMBER):
            return f"final.delta_pct.{key} is {kind(value)} {value!r:.40}, not a number"
    for task, z in record["zeroshot"].items():
        if not isinstance(z, dict):
            return f"zeroshot.{task} is {kind(z)} {z!r:.40}, not an object"
        for key in _ZEROSHOT_NUMBERS:
            value = z.get(key)
            if isinstance(value, bool) or not isinstance(value, _NUMBER):
                return f"zeroshot.{task}.{key} is {kind(value)} {value!r:.40}, not a number"
    for key in ("probes", "epochs", "loss"):
        if key in record["history"] and not isinstance(record["history"][key], list):
            return f"history.{key} is {kind(record['history'][key])}, not a list"
    return None


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

    import attndrift

    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"attndrift": attndrift.__version__, "python": sys.version.split()[0],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "platform": platform.platform(),
            "device": device, "gpu": gpu, "cpu_threads": torch.get_num_threads(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "git_commit": _git_commit()}


def file_sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[: limit or None]
