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

from attndrift.records import RECORD_FILE, RecordError, read_record

MANIFEST_FILE = "study.json"
# Config keys that do not change what a run measures: runs differing only in these (and the
# seed) are replicates of one setting. Each is operational, a matter of speed, bookkeeping or of
# which extra measurements are written, never of the training or of the probe set:
#   name, seed                     labels; the seed is what replicates differ in
#   device, tensorboard,           where it ran and what else it wrote
#   save_checkpoints
#   train.compile                  torch.compile backend: the same computation, faster
#   train.log_every                loss-log and divergence-check cadence
#   train.checkpoint_every,        resume-checkpoint cadence (a resumed run continues exactly)
#   train.checkpoint_minutes
#   data.eval_batch_size,          batch sizes of evaluation and probe forwards (no training
#   probe.batch_size               effect; eval mode has no batch statistics)
#   data.resident_mb               whether training images live on the device
#   data.zeroshot                  which transfer tasks were also evaluated (tables show each)
#   probe.precision                probe forwards in bf16 or fp32: the CLS attention row is
#                                  recomputed in fp32 from q and k either way
#   probe.aux, probe.aux_every     which auxiliary metrics were measured, and how often
#   probe.zeroshot_every,          zero-shot tracked during training, how often and on how
#   probe.zeroshot_images          many images (eval mode, no RNG drawn: the run's weights and
#                                  record are otherwise identical, checked on the tiny CLIP)
# Everything else is a factor, including train.precision (bf16 training changes the
# optimisation), probe.per_epoch (the trajectories' time points) and the probe set
# (probe.images, probe.subsets, probe.seed).
NOT_A_FACTOR = frozenset({
    "name", "seed", "device", "tensorboard", "save_checkpoints",
    "train.compile", "train.log_every", "train.checkpoint_every", "train.checkpoint_minutes",
    "data.eval_batch_size", "data.resident_mb", "data.zeroshot",
    "probe.batch_size", "probe.precision", "probe.aux", "probe.aux_every",
    "probe.zeroshot_every", "probe.zeroshot_images"})
METHOD_NAMES = {"full_ft": "full FT", "lora": "LoRA", "freeze": "freeze",
                 "linear_probe": "linear probe", "external": "measured"}
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


def _inert(flat: dict[str, Any]) -> set[str]:
    """Keys a run's method or regularizer never reads (LoRA settings of a full FT run, the
    frozen-layer count of a LoRA run, the entropy-floor ratio of APR, ...)."""
    method, reg = flat.get("method"), flat.get("regularizer.name")
    out = set()
    if method != "lora":
        out |= {k for k in flat if k.startswith("lora.")}
    if method != "freeze":
        out.add("freeze_layers")
    if reg != "entropy_floor":
        out.add("regularizer.ratio")
    if reg not in ("apr", "entropy_floor"):
        out.add("regularizer.layers")
    return out


def factors(config: dict[str, Any]) -> dict[str, Any]:
    """The run's setting as dotted key -> value: the resolved config without the seed, the
    operational keys of `NOT_A_FACTOR` and the keys its method / regularizer never reads."""
    flat = flat_config(config)
    drop = NOT_A_FACTOR | _inert(flat)
    return {k: v for k, v in flat.items() if k not in drop}


def setting_key(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """What makes runs replicates of one setting: `factors`, as a sorted hashable tuple."""
    return tuple(sorted((k, repr(v)) for k, v in factors(config).items()))


# Keys of the method axis (a family "except lr and method" drops them all).
METHOD_KEYS = ("method", "freeze_layers", "lora.")
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
    method = config.get("method", "?")
    label = METHOD_NAMES.get(method, str(method))
    if method == "lora":
        lora = config.get("lora") or {}
        label += f" r={lora.get('r', '?')} α={short_number(lora.get('alpha', '?'))}"
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


def short_number(value: Any) -> str:
    """1e-4 -> '1e-4', 3e-05 -> '3e-5', 0.001 -> '1e-3', 0.01 -> '0.01', 16.0 -> '16'."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    if value != 0 and not 1e-2 <= abs(value) < 1e4:
        mant, exp = f"{value:.2e}".split("e")
        return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{value:.4g}"
