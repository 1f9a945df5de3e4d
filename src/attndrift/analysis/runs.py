"""Load a run store into `Run` entries, and read what tables need from a run's config.

A store is a directory tree of run directories. A run directory is any directory holding a
``record.json`` or a half-written ``.record.json.*.tmp``; a study manifest (``study.json``, when
present) can also list run directories that have not written anything yet. Every run directory
becomes a `Run`, readable or not: unreadable ones get status ``corrupt`` or ``missing`` and are
shown as such, never dropped, and nothing here raises on a bad record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attndrift.records import RECORD_FILE, RecordError, read_record

MANIFEST_FILE = "study.json"
# Config keys that do not change what a run measures: runs differing only in these (and the
# seed) are replicates of one setting.
NOT_A_FACTOR = frozenset({"name", "seed", "device", "save_checkpoints", "train.log_every",
                          "data.eval_batch_size", "probe.batch_size"})
_METHOD_NAMES = {"full_ft": "full FT", "lora": "LoRA", "freeze": "freeze",
                 "linear_probe": "linear probe"}
_REG_NAMES = {"apr": "APR", "entropy_floor": "entropy floor", "l2sp": "L2-SP"}


@dataclass(frozen=True)
class Run:
    """One run directory: its record if readable, else why not."""

    path: Path
    run_id: str
    status: str  # completed | diverged | failed | running | corrupt | missing
    error: str | None
    record: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return self.status == "completed" and self.record is not None

    @property
    def config(self) -> dict[str, Any]:
        return (self.record or {}).get("config") or {}

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)


def _manifest_dirs(store: Path) -> list[Path]:
    """Run directories listed by a study manifest: ``{"runs": ["dir", {"dir": ...}, ...]}``
    relative to the store. The manifest format belongs to the studies code; this only reads
    the directory of each entry."""
    path = store / MANIFEST_FILE
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text()).get("runs", [])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return []
    dirs = []
    for e in entries if isinstance(entries, list) else []:
        if isinstance(e, dict):
            e = e.get("dir") or e.get("path")
        if isinstance(e, str):
            dirs.append(store / e)
    return dirs


def discover_run_dirs(store: Path) -> list[Path]:
    """Every run directory under ``store`` (sorted), from the filesystem and any manifest."""
    store = Path(store)
    found = {p.parent for p in store.rglob(RECORD_FILE)}
    found |= {p.parent for p in store.rglob(f".{RECORD_FILE}.*.tmp")}
    found |= set(_manifest_dirs(store))
    return sorted(found)


def load_run(run_dir: Path) -> Run:
    """Read one run directory; problems become the run's status, not exceptions."""
    run_dir = Path(run_dir)
    if not (run_dir / RECORD_FILE).exists():
        partial = sorted(run_dir.glob(f".{RECORD_FILE}.*.tmp")) if run_dir.is_dir() else []
        why = (f"only a half-written record ({partial[0].name})" if partial
               else "no record.json (not started)")
        return Run(run_dir, run_dir.name, "missing", why, None)
    try:
        record = read_record(run_dir)
    except RecordError as err:
        return Run(run_dir, run_dir.name, "corrupt", str(err), None)
    error = record.get("error")
    if record["status"] == "running":
        error = error or "record says running: in progress, or the process died"
    return Run(run_dir, str(record.get("run_id") or run_dir.name), record["status"],
               None if error is None else str(error), record)


def load_store(store: Path) -> list[Run]:
    """All runs of a store, readable or not, in directory order."""
    return [load_run(d) for d in discover_run_dirs(Path(store))]


# --- reading a run's setting --------------------------------------------------------------

def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (lists become tuples, so values are hashable)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    if not prefix:
        out.setdefault("regularizer.name", "none")
        if out["regularizer.name"] == "none":
            # regularizer settings of an unregularized run do not make it a different setting
            for key in [k for k in out if k.startswith("regularizer.") and k != "regularizer.name"]:
                del out[key]
    return out


def setting_key(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """What makes runs replicates of one setting: the config without seed and bookkeeping."""
    flat = flat_config(config)
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if k not in NOT_A_FACTOR))


def varying_keys(configs: Iterable[dict[str, Any]]) -> list[str]:
    """Config keys (dotted) whose value differs between ``configs``, seeds and bookkeeping
    excluded."""
    flats = [flat_config(c) for c in configs]
    keys = sorted({k for f in flats for k in f} - NOT_A_FACTOR)
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]


def method_label(config: dict[str, Any]) -> str:
    method = config.get("method", "?")
    label = _METHOD_NAMES.get(method, str(method))
    if method == "lora":
        lora = config.get("lora") or {}
        label += f" r={lora.get('r', '?')}"
        targets = lora.get("targets") or []
        if targets and sorted(targets) != ["q_proj", "v_proj"]:
            label += " (" + ",".join(t.removesuffix("_proj") for t in targets) + ")"
    elif method == "freeze":
        label += f" {config.get('freeze_layers', '?')}"
    elif method == "external":  # a checkpoint measured by `attndrift measure`: its recipe
        recipe = (config.get("external") or {}).get("recipe")
        label += f" {recipe}" if recipe else ""
    return label


def regularizer_label(config: dict[str, Any]) -> str:
    reg = config.get("regularizer") or {}
    name = reg.get("name", "none") if isinstance(reg, dict) else str(reg)
    if name in (None, "none"):
        return "none"
    lam = reg.get("lam")
    label = f"{_REG_NAMES.get(name, name)}" + (f" λ={lam:g}" if isinstance(lam, int | float)
                                               else "")
    # the settings that only matter to some regularizers are part of their label
    if name == "entropy_floor" and isinstance(reg.get("ratio"), int | float):
        label += f" ratio={reg['ratio']:g}"
    if name in ("apr", "entropy_floor") and reg.get("layers") is not None:
        label += f" layers={','.join(str(i) for i in reg['layers'])}"
    return label


def lr_of(config: dict[str, Any]) -> float:
    return float((config.get("train") or {}).get("lr", math.nan))


def dataset_of(config: dict[str, Any]) -> str:
    return str((config.get("data") or {}).get("dataset", "?"))
