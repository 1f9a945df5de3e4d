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
import re
from collections.abc import Iterable, Sequence
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


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def family_key(config: dict[str, Any], without: Iterable[str] = LR_KEYS
               ) -> tuple[tuple[str, str], ...]:
    """`setting_key` minus the keys in ``without`` (exact dotted keys, or prefixes ending in
    '.'): the settings of a learning-rate sweep share ``family_key(cfg)``; those that differ
    only in lr and method share ``family_key(cfg, LR_KEYS + METHOD_KEYS)``."""
    without = tuple(without)
    return tuple(kv for kv in setting_key(config) if not _matches(kv[0], without))


def varying_keys(configs: Iterable[dict[str, Any]]) -> list[str]:
    """Factor keys (dotted) whose value differs between ``configs`` (a key a config lacks
    counts as the value None)."""
    flats = [factors(c) for c in configs]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]


def method_label(config: dict[str, Any]) -> str:
    method = config.get("method", "?")
    label = _METHOD_NAMES.get(method, str(method))
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


# --- settings and their labels -------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """The runs (readable records) of one setting, in seed order, and its label among the
    settings it was grouped with."""

    key: tuple[tuple[str, str], ...]
    runs: tuple[Run, ...]
    label: str

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def completed(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def seeds(self) -> list[Any]:
        return [r.config.get("seed") for r in self.runs]


def _seed_order(run: Run) -> tuple:
    seed = run.config.get("seed")
    return (0, seed, "") if isinstance(seed, int | float) else (1, 0, str(seed))


def _value(key: str, value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(str(v).removesuffix("_proj") for v in value)
    return short_number(value) if isinstance(value, float) else str(value)


def _lora_part(f: dict[str, Any], shown: set[str]) -> str:
    part = f"LoRA r={_value('', f.get('lora.r'))}"
    if "lora.alpha" in shown:
        part += f" α={_value('', f.get('lora.alpha'))}"
    if "lora.targets" in shown or ("lora.targets" in f and sorted(f["lora.targets"]) != [
            "q_proj", "v_proj"]):
        part += f" ({_value('', f.get('lora.targets'))})"
    if "lora.dropout" in shown:
        part += f" dropout={_value('', f.get('lora.dropout'))}"
    return part


def _method_part(f: dict[str, Any], lora_shown: set[str]) -> str:
    method = f.get("method")
    if method == "lora":
        return _lora_part(f, lora_shown)
    if method == "freeze":
        return f"freeze {f.get('freeze_layers', '?')}"
    return _METHOD_NAMES.get(str(method), str(method))


def _reg_part(f: dict[str, Any]) -> str:
    cfg: dict[str, Any] = {}
    for k, v in f.items():
        if k.startswith("regularizer."):
            cfg[k.split(".", 1)[1]] = list(v) if isinstance(v, tuple) else v
    label = regularizer_label({"regularizer": cfg})
    return "no reg." if label == "none" else label


def key_label(key: str, value: Any) -> str:
    names = {"train.weight_decay": "wd", "train.epochs": "ep", "train.lr": "lr",
             "train.max_steps": "max steps", "train.batch_size": "batch",
             "train.warmup_frac": "warmup", "train.precision": "train precision"}
    name = names.get(key) or (key.split(".", 1)[1] if key.startswith(("train.", "data."))
                              else key)
    if key == "train.epochs":
        return f"{_value(key, value)} ep"
    return f"{name} {_value(key, value)}"


def _short_models(models: Iterable[Any]) -> dict[Any, str]:
    """Model id -> short name, falling back to the full id where two would read the same."""
    models = sorted({str(m) for m in models})
    short = {m: short_model(m) for m in models}
    clash = {s for s in short.values() if list(short.values()).count(s) > 1}
    return {m: (m if s in clash else s) for m, s in short.items()}


def _modal(values: list[Any]) -> Any:
    """The most common value (ties: the first in repr order)."""
    reprs = [repr(v) for v in values]
    best = max(sorted(set(reprs)), key=reprs.count)
    return values[reprs.index(best)]


def labels_of(factor_sets: Sequence[dict[str, Any]]) -> list[str]:
    """A label per factor set naming what distinguishes it from the others given, joined by
    ' · ': model, dataset, method (LoRA with r, and alpha / targets / dropout where those vary
    among the LoRA settings), regularizer, other keys, lr last. Model, dataset, method and lr
    are shown whenever they vary; the regularizer only where there is one, and other keys
    (weight decay, epochs, ...) only where a setting departs from their most common value. When
    nothing varies, the label describes the one setting by its model, dataset and method."""
    keys = sorted({k for f in factor_sets for k in f})
    varying = {k for k in keys if len({repr(f.get(k)) for f in factor_sets}) > 1}
    loras = [f for f in factor_sets if f.get("method") == "lora"]
    lora_shown = {k for k in keys if k.startswith("lora.")
                  and len({repr(f.get(k)) for f in loras}) > 1}
    method_varies = bool(varying & {"method", "freeze_layers"}) or bool(lora_shown)
    reg_varies = any(k.startswith("regularizer.") for k in varying)
    models = _short_models(f.get("model") for f in factor_sets)
    if not varying:
        varying, method_varies = {"model", "data.dataset"}, True
    others = other_labels(factor_sets)
    out = []
    for i, f in enumerate(factor_sets):
        parts = []
        if "model" in varying:
            parts.append(models.get(str(f.get("model")), str(f.get("model"))))
        if "data.dataset" in varying:
            parts.append(str(f.get("data.dataset")))
        if method_varies:
            parts.append(_method_part(f, lora_shown))
        if reg_varies and f.get("regularizer.name", "none") != "none":
            parts.append(_reg_part(f))
        if others[i] != "—":
            parts.append(others[i])
        if "train.lr" in varying:
            parts.append(key_label("train.lr", f.get("train.lr")))
        out.append(" · ".join(parts))
    return _disambiguate(out, factor_sets)


def other_labels(factor_sets: Sequence[dict[str, Any]]) -> list[str]:
    """Per factor set, the keys outside the model / dataset / method / regularizer / lr axes
    (weight decay, epochs, ...) where it departs from their most common value among
    ``factor_sets``, e.g. 'wd 0.1'; '—' where it departs in none."""
    keys = sorted({k for f in factor_sets for k in f})
    rest = [k for k in keys if len({repr(f.get(k)) for f in factor_sets}) > 1
            and k not in ("model", "data.dataset", "method", "freeze_layers", "train.lr")
            and not k.startswith(("lora.", "regularizer."))]
    usual = {k: _modal([f.get(k) for f in factor_sets]) for k in rest}
    out = []
    for f in factor_sets:
        parts = [(key_label(k, f[k]) if k in f else f"{k}: not set") for k in rest
                 if repr(f.get(k)) != repr(usual[k])]
        out.append(" · ".join(parts) or "—")
    return out


_METHOD_RANK = {"full_ft": 0, "lora": 1, "freeze": 2, "linear_probe": 3}


def setting_order(config: dict[str, Any]) -> tuple:
    """Sort key of a setting: model, dataset (case-insensitive), method (full FT, LoRA by r
    and alpha, freeze by layers, linear probe), regularizer (none first, then by λ), the other
    factors, lr last (numerically)."""
    f = factors(config)

    def n(key: str) -> float:
        v = f.get(key)
        return float(v) if isinstance(v, int | float) else -1.0

    primary = {"model", "data.dataset", "method", "freeze_layers", "train.lr",
               "regularizer.name", "regularizer.lam"}
    rest = tuple((k, _sortable(v)) for k, v in sorted(f.items())
                 if k not in primary and not k.startswith("lora."))
    reg = str(f.get("regularizer.name", "none"))
    return (short_model(str(f.get("model"))).casefold(), str(f.get("data.dataset")).casefold(),
            _METHOD_RANK.get(str(f.get("method")), 9), str(f.get("method")), n("lora.r"),
            n("lora.alpha"), repr(f.get("lora.targets")), n("freeze_layers"),
            reg != "none", reg, n("regularizer.lam"), rest, n("train.lr"))


def _sortable(value: Any) -> tuple:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value).casefold())


def _disambiguate(labels: list[str], factor_sets: Sequence[dict[str, Any]]) -> list[str]:
    """Labels that still read the same (rounded numbers, ...) get the keys they differ in."""
    out = list(labels)
    for label in set(labels):
        same = [i for i, x in enumerate(labels) if x == label]
        if len(same) < 2:
            continue
        sets = [factor_sets[i] for i in same]
        diff = sorted(k for k in {k for f in sets for k in f}
                      if len({repr(f.get(k)) for f in sets}) > 1)
        for i in same:
            out[i] = label + " · " + ", ".join(f"{k}={factor_sets[i].get(k)!r}" for k in diff)
    return out


def group_settings(runs: Iterable[Run]) -> list[Setting]:
    """Runs with a readable config grouped into settings (identical `factors`), each labelled
    against the others, runs in seed order (numeric), settings in `setting_order`."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.record is not None:
            groups.setdefault(setting_key(r.config), []).append(r)
    keys = list(groups)
    labels = labels_of([factors(groups[k][0].config) for k in keys])
    out = [Setting(k, tuple(sorted(groups[k], key=_seed_order)), lab)
           for k, lab in zip(keys, labels, strict=True)]
    return sorted(out, key=lambda s: (setting_order(s.config), s.label))


def setting_labels(runs: Iterable[Run]) -> dict[tuple[tuple[str, str], ...], str]:
    """`setting_key` -> the setting's label among the settings of ``runs``."""
    return {s.key: s.label for s in group_settings(runs)}


@dataclass(frozen=True)
class Family:
    """Settings equal but for the keys a family ignores (e.g. an lr sweep), labelled against
    the other families; settings in lr order."""

    key: tuple[tuple[str, str], ...]
    settings: tuple[Setting, ...]
    label: str


def group_families(runs: Iterable[Run], without: Iterable[str] = LR_KEYS) -> list[Family]:
    """Settings grouped by `family_key` (default: same setting except lr), in
    `setting_order`."""
    without = tuple(without)
    groups: dict[tuple, list[Setting]] = {}
    for s in group_settings(runs):
        groups.setdefault(family_key(s.config, without), []).append(s)
    keys = list(groups)
    sets = [{k: v for k, v in factors(groups[k][0].config).items() if not _matches(k, without)}
            for k in keys]
    labels = labels_of(sets)
    out = [Family(k, tuple(sorted(groups[k], key=lambda s: (lr_of(s.config), s.label))), lab)
           for k, lab in zip(keys, labels, strict=True)]
    return sorted(out, key=lambda f: (setting_order(f.settings[0].config), f.label))
