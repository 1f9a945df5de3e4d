"""The run store: one directory per run, claimed under a file lock, records written atomically.

Layout::

    STORE/study.json            manifest: the study's name and every planned run (id, group, axes,
                                config), rewritten atomically whenever a study starts
    STORE/runs/<run_id>/        record.json, checkpoints, resume state
    STORE/runs/<run_id>/.lock   held by the worker executing the run

A claim is an OS file lock (fcntl/LockFileEx via `filelock`): it is released when its holder
exits, even on kill -9, so a crashed worker never leaves a run stuck. Two workers (processes, or
machines sharing a filesystem with working locks) never execute the same run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from attndrift.records import RecordError, atomic_write_bytes, read_record
from attndrift.study.spec import PlannedRun

MANIFEST = "study.json"
DONE = ("completed",)
UNSUCCESSFUL = ("failed", "diverged")


class StoreError(FileNotFoundError):
    """The store holds no readable study; ``str(err)`` is one line naming the fix."""


@dataclass(frozen=True)
class RunState:
    run_id: str
    status: str  # pending | running | completed | failed | diverged | corrupt
    error: str | None = None


class Store:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def run_dir(self, run_id: str) -> Path:
        """``STORE/runs/<run_id>``; refuses an id that is not one safe path component, so
        nothing (run directory, lock, temp clean-up) ever happens outside the store."""
        from attndrift.study.spec import safe_component

        if safe_component(run_id) != run_id:
            raise ValueError(f"run id {run_id!r} is not a safe directory name")
        return self.root / "runs" / run_id

    def write_manifest(self, name: str, planned: list[PlannedRun]) -> None:
        manifest = {"study": name, "runs": [
            {"run_id": p.run_id, "dir": f"runs/{p.run_id}", "group": p.group, "axes": p.axes,
             "config": p.config.model_dump(mode="json")} for p in planned]}
        atomic_write_bytes(self.root / MANIFEST, json.dumps(manifest, indent=1).encode())

    def manifest(self) -> dict[str, Any]:
        """The study's manifest; raises `StoreError` (one line) when it is missing or is not
        one this version wrote (truncated, hand-edited)."""
        path = self.root / MANIFEST
        if not path.is_file():
            raise StoreError(f"{self.root} holds no study (no {MANIFEST}); run "
                             "`attndrift study run STUDY.yaml --store DIR` first")
        fix = "`attndrift study run STUDY.yaml --store DIR` rewrites it"
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise StoreError(f"{path} is unreadable ({type(err).__name__}: "
                             f"{str(err)[:200]}); {fix}") from None
        runs = data.get("runs") if isinstance(data, dict) else None
        bad = not isinstance(runs, list) or not all(
            isinstance(r, dict) and isinstance(r.get("run_id"), str) for r in runs)
        if bad:
            raise StoreError(f"{path} is not a study manifest (expected runs: a list of "
                             f"entries with a run_id); {fix}")
        return data

    def state(self, run_id: str) -> RunState:
        """What the run's directory says, without taking its lock."""
        run_dir = self.run_dir(run_id)
        if not (run_dir / "record.json").exists():
            return RunState(run_id, "pending")
        try:
            record = read_record(run_dir)
        except RecordError as err:
            return RunState(run_id, "corrupt", str(err))
        return RunState(run_id, record["status"], record.get("error"))

    def is_locked(self, run_id: str) -> bool:
        """Whether a worker holds the run's claim. Read-only: creates nothing, and works on a
        store this process may not write (`held`)."""
        return held(self.run_dir(run_id))

    def lock(self, run_id: str) -> FileLock:
        return claim(self.run_dir(run_id))

    def needs_run(self, run_id: str, retry_failed: bool) -> bool:
        status = self.state(run_id).status
        if status in DONE:
            return False
        return not (status in UNSUCCESSFUL and not retry_failed)


def claim(run_dir: Path) -> FileLock:
    """The claim on a run directory (``run_dir/.lock``), taken by whoever executes the run
    there: a study worker, or `attndrift run --out run_dir`. Creates ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(run_dir / ".lock", thread_local=False)


def held(run_dir: Path) -> bool:
    """Whether another process holds ``run_dir``'s claim, found without writing anything: no
    ``.lock`` file means no holder (a holder creates it); an existing one is opened read-only
    and probed with a non-blocking shared ``flock``, which conflicts with the holder's."""
    path = run_dir / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # missing (nobody ever claimed it) or unreadable: as good as missing
        return False
    try:
        import fcntl
    except ImportError:  # Windows: filelock's own probe (it opens the file for writing)
        os.close(fd)
        lock = FileLock(path, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
