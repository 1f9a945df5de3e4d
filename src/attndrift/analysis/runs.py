"""Load a run store into `Run` entries, and read a run's setting from its config (`factors`:
what makes runs replicates; grouping and labels are in `attndrift.analysis.settings`).

A store is a directory tree of run directories. A run directory is any directory holding a
``record.json`` or a half-written ``.record.json.*.tmp``; a study manifest (``study.json``, when
present) can also list run directories that have not written anything yet. Every run directory
becomes a `Run`, readable or not: unreadable ones get status ``corrupt`` or ``missing`` and are
shown as such, never dropped, and nothing here raises on a bad record.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attndrift.config import RUN_ROLES
from attndrift.methods import METHODS, method_spec, regularizer_spec
from attndrift.methods import short_number as short_number  # re-exported: labels use it
from attndrift.records import RECORD_FILE, RecordError, read_record

MANIFEST_FILE = "study.json"
# Config keys that do not change what a run measures: runs differing only in these (and the
# seed) are replicates of one setting. Derived from the fields' roles (`attndrift.config`:
# replicate and operational), where each says why it is not a factor. Everything else is a
# factor, including train.precision (bf16 training changes the optimisation), probe.per_epoch
# (the trajectories' time points) and the probe set (probe.images, probe.subsets, probe.seed).
NOT_A_FACTOR = RUN_ROLES.keys_with_role("replicate", "operational")
# Keys only some methods / regularizers read (the others' settings ignore them).
METHOD_SPECIFIC = RUN_ROLES.keys_with_role("method")
REGULARIZER_SPECIFIC = RUN_ROLES.keys_with_role("regularizer")
METHOD_NAMES = {name: spec.label for name, spec in METHODS.items()}


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
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        # unreadable (truncated, hand-edited, nested past the parser's depth): the records on
        # disk are still found; `study status` says what is wrong with the manifest
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
            for key in REGULARIZER_SPECIFIC & out.keys():
                del out[key]
    return out


def _inert(flat: dict[str, Any]) -> set[str]:
    """Keys a run's method or regularizer never reads (LoRA settings of a full FT run, the
    frozen-layer count of a LoRA run, the entropy-floor ratio of APR, ...: the method-specific
    keys outside `MethodSpec.reads`, the regularizer-specific ones outside
    `RegularizerSpec.reads`), and fields added later that are at their default."""
    method, reg = method_spec(flat.get("method")), regularizer_spec(flat.get("regularizer.name"))
    out = set(METHOD_SPECIFIC) - set(method.reads if method else ())
    out |= REGULARIZER_SPECIFIC - set(reg.reads if reg else ())
    return (out & flat.keys()) | RUN_ROLES.at_omitted_default(flat)


def factors(config: dict[str, Any]) -> dict[str, Any]:
    """The run's setting as dotted key -> value: the resolved config without the seed, the
    operational keys of `NOT_A_FACTOR` and the keys its method / regularizer never reads."""
    flat = flat_config(config)
    drop = NOT_A_FACTOR | _inert(flat)
    # the keys inside an optional section that is not a factor (data.robustness.*) are not
    return {k: v for k, v in flat.items() if k not in drop
            and not any(k.startswith(f"{p}.") for p in NOT_A_FACTOR)}


def setting_key(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """What makes runs replicates of one setting: `factors`, as a sorted hashable tuple."""
    return tuple(sorted((k, repr(v)) for k, v in factors(config).items()))


# Keys of the method axis (a family "except lr and method" drops them all).
METHOD_KEYS = ("method", *sorted(METHOD_SPECIFIC))
LR_KEYS = ("train.lr",)


def matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def family_key(config: dict[str, Any], without: Iterable[str] = LR_KEYS
               ) -> tuple[tuple[str, str], ...]:
    """`setting_key` minus the keys in ``without`` (exact dotted keys, or prefixes ending in
    '.'): the settings of a learning-rate sweep share ``family_key(cfg)``; those that differ
    only in lr and method share ``family_key(cfg, LR_KEYS + METHOD_KEYS)``."""
    without = tuple(without)
    return tuple(kv for kv in setting_key(config) if not matches(kv[0], without))


def varying_keys(configs: Iterable[dict[str, Any]]) -> list[str]:
    """Factor keys (dotted) whose value differs between ``configs`` (a key a config lacks
    counts as the value None)."""
    flats = [factors(c) for c in configs]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]


def method_label(config: dict[str, Any]) -> str:
    """A run's method with the options its setting reads (LoRA with r and alpha, ...)."""
    method = config.get("method", "?")
    spec = method_spec(method)
    if spec is not None:
        flat = flat_config(config)
        return spec.label_of(flat, {"lora.alpha"} & set(spec.reads))
    if method == "external":  # a checkpoint measured by `attndrift measure`: its recipe
        recipe = (config.get("external") or {}).get("recipe")
        return f"measured {recipe}" if recipe else "measured"
    return str(method)


def regularizer_label(config: dict[str, Any]) -> str:
    reg = config.get("regularizer") or {}
    name = reg.get("name", "none") if isinstance(reg, dict) else str(reg)
    if name in (None, "none"):
        return "none"
    spec = regularizer_spec(name)
    if spec is None:
        lam = reg.get("lam")
        return str(name) + (f" λ={lam:g}" if isinstance(lam, int | float) else "")
    return spec.label_of(reg)


def lr_of(config: dict[str, Any]) -> float:
    return float((config.get("train") or {}).get("lr", math.nan))


def dataset_of(config: dict[str, Any]) -> str:
    return str((config.get("data") or {}).get("dataset", "?"))


def model_of(config: dict[str, Any]) -> str:
    """The backbone as configured: 'tiny', a hub id or a local directory."""
    return str(config.get("model", "?"))


_VIT = re.compile(r"vit[-_/]?(base|large|huge|giant|bigg|b|l|h|g)[-_/]?(?:patch)?(\d+)", re.I)
_SIZES = {"base": "B", "large": "L", "huge": "H", "giant": "g", "bigg": "bigG"}


def short_model(model: str) -> str:
    """A readable backbone name: 'openai/clip-vit-base-patch32' -> 'ViT-B/32',
    'openai/clip-vit-large-patch14-336' -> 'ViT-L/14@336'; anything else its last path part."""
    m = _VIT.search(model)
    if m is None:
        return model.rstrip("/").rsplit("/", 1)[-1] or model
    size = _SIZES.get(m.group(1).lower(), m.group(1).upper())
    res = re.search(r"[-_](224|240|256|280|336|378|384|448|512)\b", model[m.end():])
    return f"ViT-{size}/{m.group(2)}" + (f"@{res.group(1)}" if res else "")
