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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from attndrift.records import RecordError, atomic_write_bytes, read_record
from attndrift.study.spec import PlannedRun

MANIFEST = "study.json"
DONE = ("completed",)
UNSUCCESSFUL = ("failed", "diverged")


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
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} holds no study (no {MANIFEST}); run "
                                    "`attndrift study run STUDY.yaml --store DIR` first")
        return json.loads(path.read_text())

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
        lock = self.lock(run_id)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def lock(self, run_id: str) -> FileLock:
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(run_dir / ".lock", thread_local=False)

    def needs_run(self, run_id: str, retry_failed: bool) -> bool:
        status = self.state(run_id).status
        if status in DONE:
            return False
        return not (status in UNSUCCESSFUL and not retry_failed)
