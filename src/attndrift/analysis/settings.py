"""Settings: runs grouped by the one definition of a setting (`runs.factors`: the resolved
config minus the seed and the operational keys), families of settings (the same but for the lr,
or lr and method), and the labels that name what distinguishes each from the others present.
Every table, statistic and figure groups runs with these (issue 12).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from attndrift.analysis.runs import (
    LR_KEYS,
    METHOD_KEYS,
    METHOD_SPECIFIC,
    Run,
    factors,
    family_key,
    lr_of,
    matches,
    regularizer_label,
    setting_key,
    short_model,
    short_number,
)
from attndrift.guard import auto_direction
from attndrift.methods import method_spec
from attndrift.signals import SIGNALS
from attndrift.tracked import SIGNALS as TRACKED


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


def seed_order(run: Run) -> tuple:
    """Sort key of a run by seed: numeric seeds in numeric order (7, 11, 19), others after."""
    seed = run.config.get("seed")
    return (0, seed, "") if isinstance(seed, int | float) else (1, 0, str(seed))


def _value(key: str, value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(str(v).removesuffix("_proj") for v in value)
    return short_number(value) if isinstance(value, float) else str(value)


def _method_part(f: dict[str, Any], shown: set[str]) -> str:
    if f.get("method") == "external":  # a measured checkpoint: its recipe (issue 22.6)
        recipe = f.get("external.recipe")
        return f"measured {recipe}" if recipe else "measured"
    spec = method_spec(f.get("method"))
    return spec.label_of(f, shown) if spec else str(f.get("method"))


def _method_keys_shown(factor_sets: Sequence[dict[str, Any]]) -> set[str]:
    """Method-specific keys that vary among the settings of the methods reading them (LoRA's
    alpha where LoRA settings differ in it, ...)."""
    shown = set()
    for key in METHOD_SPECIFIC:
        readers = [f for f in factor_sets
                   if key in getattr(method_spec(f.get("method")), "reads", ())]
        if len({repr(f.get(key)) for f in readers}) > 1:
            shown.add(key)
    return shown


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
    shown = _method_keys_shown(factor_sets)
    method_varies = ("method" in varying or bool(shown)
                     or any(k.startswith("external.") for k in varying))
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
            parts.append(_method_part(f, shown))
        if reg_varies and f.get("regularizer.name", "none") != "none":
            parts.append(_reg_part(f))
        if others[i] != "—":
            parts.append(others[i])
        if "train.lr" in varying:
            parts.append(key_label("train.lr", f.get("train.lr")))
        # only other keys vary and this set has their usual values: name it by its method
        out.append(" · ".join(parts or [_method_part(f, shown)]))
    return _disambiguate(out, factor_sets)


def other_labels(factor_sets: Sequence[dict[str, Any]]) -> list[str]:
    """Per factor set, the keys outside the model / dataset / method / regularizer / lr axes
    (weight decay, epochs, ...) where it departs from their most common value among
    ``factor_sets``, e.g. 'wd 0.1'; '—' where it departs in none."""
    keys = sorted({k for f in factor_sets for k in f})
    rest = [k for k in keys if len({repr(f.get(k)) for f in factor_sets}) > 1
            and k not in ("model", "data.dataset", "train.lr") and not matches(k, METHOD_KEYS)
            and not k.startswith(("regularizer.", "external."))]
    usual = {k: _modal([f.get(k) for f in factor_sets]) for k in rest}
    out = []
    for f in factor_sets:
        parts = [(key_label(k, f[k]) if k in f else f"{k}: not set") for k in rest
                 if repr(f.get(k)) != repr(usual[k]) and not k.startswith("guard.")]
        # a guarded setting is named by its guard whatever is most common (unguarded: none)
        if any(k.startswith("guard.") for k in rest) and f.get("guard.signal") is not None:
            parts.append(guard_label(f))
        out.append(" · ".join(parts) or "—")
    return out


def guard_label(f: dict[str, Any]) -> str:
    """The guard of a factor set in one part, e.g. 'guard: stop at |Δ entropy| > 25 from 20%'."""
    name = f.get("guard.signal")
    sig, spec = TRACKED.get(str(name)), SIGNALS.get(str(name))
    direction = f.get("guard.direction", "auto")
    if direction == "auto":  # as the guard resolves it
        direction = auto_direction(sig) if sig else "above"
    threshold = _value("guard.threshold", f.get("guard.threshold"))
    part = (f"guard: {f.get('guard.action', 'warn')} at {spec.short if spec else name} "
            f"{'>' if direction == 'above' else '<'} {threshold}")
    if f.get("guard.start"):
        part += f" from {float(f['guard.start']):.0%}"
    if f.get("guard.task"):
        part += f" ({f['guard.task']})"
    return part


def setting_order(config: dict[str, Any]) -> tuple:
    """Sort key of a setting: model, dataset (case-insensitive), method (in registry rank,
    then by the keys it reads in their declared order: LoRA by r and alpha, freeze by layers),
    regularizer (none first, then by λ), the other factors, lr last (numerically)."""
    f = factors(config)

    def n(key: str) -> float:
        v = f.get(key)
        return float(v) if isinstance(v, int | float) else -1.0

    spec = method_spec(f.get("method"))
    # a key left out at its default (lora.train_projection) sorts before any other value
    own = tuple((1, _sortable(f[k])) if k in f else (0, (0, 0.0, ""))
                for k in (spec.reads if spec else ()))
    primary = {"model", "data.dataset", "train.lr", "regularizer.name", "regularizer.lam"}
    rest = tuple((k, _sortable(v)) for k, v in sorted(f.items())
                 if k not in primary and not matches(k, METHOD_KEYS))
    reg = str(f.get("regularizer.name", "none"))
    return (short_model(str(f.get("model"))).casefold(), str(f.get("data.dataset")).casefold(),
            spec.rank if spec else 99, str(f.get("method")), own,
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
    out = [Setting(k, tuple(sorted(groups[k], key=seed_order)), lab)
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
    sets = [{k: v for k, v in factors(groups[k][0].config).items() if not matches(k, without)}
            for k in keys]
    labels = labels_of(sets)
    out = [Family(k, tuple(sorted(groups[k], key=lambda s: (lr_of(s.config), s.label))), lab)
           for k, lab in zip(keys, labels, strict=True)]
    return sorted(out, key=lambda f: (setting_order(f.settings[0].config), f.label))
