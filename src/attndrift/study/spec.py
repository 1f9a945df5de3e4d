"""A study is data: a YAML spec expanded by a pure function into runs with stable ids.

```yaml
name: demo
base: ../runs/tiny_full_ft.yaml   # optional run config every run starts from (relative path)
set: {train.epochs: 3}            # dotted overrides for every run
runs:                             # named single runs
  - name: apr
    set: {method: full_ft}
grids:                            # products over any config keys
  - name: sweep
    axes: {method: [full_ft, lora], train.lr: [1e-4, 1e-3], seed: [0, 1]}
    set: {probe.per_epoch: 5}
    where:                        # per-entry overrides, applied when the axes match
      - if: {method: lora}
        set: {lora.r: 4}
```

A run's id is ``<readable slug>-<8 hex of its resolved config>``: the same config always gets
the same id, and any change to it gets a new one. The id is one safe path component
(`safe_component`): a value such as ``openai/clip-vit-b-16`` or ``../x`` in a grid never makes a
nested directory or one outside the store.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from attndrift.config import (
    ConfigError,
    RunConfig,
    _set_dotted,
    identity,
    validate,
)
from attndrift.fields import dotted
from attndrift.pathsafe import safe_component
from attndrift.records import config_digest
from attndrift.study import MAX_RUNS
from attndrift.yamlio import YamlError, parse_yaml


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Conditional(_Spec):
    if_: dict[str, Any] = Field(alias="if")
    set: dict[str, Any]


class RunEntry(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    set: dict[str, Any] = {}


class GridEntry(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    axes: dict[str, list[Any]] = Field(min_length=1)
    set: dict[str, Any] = {}
    where: list[Conditional] = []

    @model_validator(mode="after")
    def _conditions_name_axes(self) -> GridEntry:
        # a typo in an `if` key or value would silently never match: refuse it
        empty = [k for k, v in self.axes.items() if not v]
        if empty:
            raise ValueError(f"axis {', '.join(empty)} has no values")
        for c in self.where:
            for key, value in c.if_.items():
                if key not in self.axes:
                    raise ValueError(f"where: if key {key!r} is not an axis of this grid "
                                     f"({', '.join(self.axes)})")
                if value not in self.axes[key]:
                    raise ValueError(f"where: if {key}={value!r} matches no value of that axis "
                                     f"({self.axes[key]})")
        return self


class StudySpec(_Spec):
    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    description: str = ""
    base: str | None = None
    set: dict[str, Any] = {}
    runs: list[RunEntry] = []
    grids: list[GridEntry] = []

    @model_validator(mode="after")
    def _not_empty(self) -> StudySpec:
        if not self.runs and not self.grids:
            raise ValueError("the study has no runs and no grids")
        return self


MAX_SLUG = 120  # characters of a grid run's readable id prefix


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    group: str
    axes: dict[str, Any]
    config: RunConfig


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_hash(config: RunConfig) -> str:
    """8 hex of the resolved config, operational settings left out (`config.identity`)."""
    return config_digest(identity(config.model_dump(mode="json")))


def _resolve(base: dict, layers: list[dict[str, Any]], name: str, where: str) -> RunConfig:
    data = json.loads(json.dumps(base))  # deep copy of plain data
    for layer in layers:  # values are plain data already: set, not re-parsed as YAML text
        for key, value in layer.items():
            _set_dotted(data, str(key).strip(), copy.deepcopy(value))
    data["name"] = name
    try:
        return validate(data, where)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_spec(path: str | Path) -> tuple[StudySpec, dict]:
    """Parse and check a study YAML; returns the spec and its base run config (plain data)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} not found")
    raw = _read_yaml(path) or {}
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "study"
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{path}: {loc[:80]}: {msg[:300]}") from None  # never a whole value
    base: dict = {}
    if spec.base:
        base_path = (path.parent / spec.base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{path}: base config {spec.base} not found at {base_path}")
        base = _read_yaml(base_path) or {}
        if not isinstance(base, dict):
            raise ConfigError(f"{path}: base config {spec.base} holds a "
                              f"{type(base).__name__}, not a mapping of config keys")
    return spec, base


def _read_yaml(path: Path) -> Any:
    try:
        return parse_yaml(path.read_text())
    except YamlError as err:
        raise ConfigError(f"{path}: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it ({err})") from None


def run_count(spec: StudySpec) -> int:
    """How many runs ``spec`` expands to, without expanding it."""
    return len(spec.runs) + sum(math.prod(len(v) for v in g.axes.values()) for g in spec.grids)


def expand(spec: StudySpec, base: dict, max_runs: int = MAX_RUNS) -> list[PlannedRun]:
    """Every run of the study, in spec order; raises `ConfigError` naming the bad entry, or
    when the study has more than ``max_runs`` runs (checked before expanding anything)."""
    total = run_count(spec)
    if total > max_runs:
        raise ConfigError(f"study {spec.name} expands to {total:,} runs, more than the "
                          f"{max_runs:,} allowed; split it, or raise --max-runs if you mean it")
    planned: list[PlannedRun] = []
    for entry in spec.runs:
        cfg = _resolve(base, [spec.set, entry.set], entry.name, f"{spec.name}/{entry.name}")
        planned.append(PlannedRun(f"{entry.name}-{config_hash(cfg)}", entry.name, {}, cfg))
    for grid in spec.grids:
        keys = list(grid.axes)
        for values in itertools.product(*(grid.axes[k] for k in keys)):
            axes = dict(zip(keys, values, strict=True))
            extra = [c.set for c in grid.where
                     if all(axes.get(k) == v for k, v in c.if_.items())]
            slug = safe_component(
                "-".join([grid.name, *(f"{_short(k)}={_fmt(v)}" for k, v in axes.items())]))
            if len(slug) > MAX_SLUG:  # a directory name; the hash keeps ids distinct
                slug = slug[:MAX_SLUG].rstrip("-_.")
            cfg = _resolve(base, [spec.set, grid.set, axes, *extra], slug,
                           f"{spec.name}/{slug}")
            planned.append(PlannedRun(f"{slug}-{config_hash(cfg)}", grid.name, axes, cfg))
    counts = Counter(p.run_id for p in planned)  # linear: list.count was quadratic
    dupes = sorted(i for i, n in counts.items() if n > 1)
    if dupes:
        raise ConfigError(f"study {spec.name}: duplicate runs {dupes}; give entries distinct names")
    return planned


def load_study(path: str | Path, max_runs: int = MAX_RUNS
               ) -> tuple[StudySpec, list[PlannedRun]]:
    spec, base = load_spec(path)
    return spec, expand(spec, base, max_runs)


def distinguishing(planned: list[PlannedRun]) -> tuple[list[str], list[dict[str, Any]]]:
    """The resolved config keys whose values differ between the runs (the name aside), in
    config order, and each run's values of them: what ``attndrift study plan`` prints."""
    flats = [dotted(p.config.model_dump(mode="json")) for p in planned]
    keys = [k for k in (flats[0] if flats else {}) if k != "name"
            and len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
    return keys, [{k: f.get(k) for k in keys} for f in flats]

