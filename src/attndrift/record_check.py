"""What a record read from disk must look like for downstream readers to use it.

`problem` names the first field of a parsed record whose type a reader (compare, analysis,
report, interpolate) could not use, or returns None. It checks types, not values: a
hand-edited number stays a number, but ``config.train.lr: "fast"`` or
``final.delta_pct_layers.entropy: "x"`` makes the record corrupt, with the field named, instead
of a traceback in whichever table reads it first. The config section is checked against the
run config's own field types (`attndrift.config.RunConfig`), only for the keys present: a
measured checkpoint's record holds a partial config, and choices (``method``) are checked as
strings, so a record of a method this version does not know still loads.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

_STRICT = ConfigDict(strict=True)
Num = float | None  # JSON has no NaN: a non-finite value was written as null

_NUM = TypeAdapter(Num, config=_STRICT)
_NUM_MAP = TypeAdapter(dict[str, Num], config=_STRICT)
_NUM_LISTS = TypeAdapter(dict[str, list[Num]], config=_STRICT)
_MAPS = TypeAdapter(list[dict[str, Num]], config=_STRICT)
_NUMS = TypeAdapter(list[Num], config=_STRICT)
_GRID = TypeAdapter(list[list[Num]], config=_STRICT)
_STR = TypeAdapter(str, config=_STRICT)
_STRS = TypeAdapter(list[str], config=_STRICT)

# fields of "final" and of each "zeroshot" task that readers format as numbers
FINAL_NUMBERS = ("step", "epochs", "val_acc", "best_val_acc", "best_epoch", "test_acc",
                 "train_loss")
ZEROSHOT_NUMBERS = ("before", "after", "retention_pct", "chance", "classes")
SECTIONS = ("config", "provenance", "baseline", "history", "final", "zeroshot", "timing")
# keys of a metric table (`probes.metrics.summarize`) that are not a metric
_NOT_METRICS = {"mean": _NUM_MAP, "subsets": _MAPS}


class _Bad(Exception):
    """A field of the wrong type: ``where`` (dotted) and a description."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where} {what}")


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.40}"


def _check(adapter: TypeAdapter, value: Any, where: str, expected: str) -> None:
    try:
        adapter.validate_python(value)
    except ValidationError as err:
        loc = err.errors()[0]["loc"]
        inner = ".".join(str(p) for p in loc)
        raise _Bad(f"{where}.{inner}" if inner else where,
                   f"is {_kind(_at(value, loc))}, not {expected}") from None


def _at(value: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            break
    return value


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(where, f"is {_kind(value)}, not an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(where, f"is {_kind(value)}, not a list")
    return value


def _metric_table(table: Any, where: str, extra: tuple[str, ...] = ()) -> None:
    """A `summarize` table: ``mean`` (metric -> number) and, per metric it names, ``layers``
    (and ``heads``); plus ``extra`` keys (``aux``, ``zeroshot_subset``) that are objects.
    Keys that are none of these (a later version's) are left alone."""
    table = _object(table, where)
    for key, adapter in _NOT_METRICS.items():
        if key in table:
            _check(adapter, table[key], f"{where}.{key}", "numbers")
    for key in extra:
        if key in table:
            _object(table[key], f"{where}.{key}")
    for key, value in table.items():
        if key in table.get("mean", {}) or (isinstance(value, dict) and "layers" in value):
            block = _object(value, f"{where}.{key}")
            _check(_NUMS, block.get("layers", []), f"{where}.{key}.layers", "a list of numbers")
            _check(_GRID, block.get("heads", []), f"{where}.{key}.heads", "lists of numbers")


def _final(final: dict[str, Any]) -> None:
    for key in FINAL_NUMBERS:
        _check(_NUM, final.get(key), f"final.{key}", "a number")
    for key in ("delta_pct", "delta_pct_subset_mean"):
        _check(_NUM_MAP, final.get(key, {}), f"final.{key}", "an object of numbers")
    _check(_NUM_LISTS, final.get("delta_pct_layers", {}), "final.delta_pct_layers",
           "lists of numbers")
    _check(_MAPS, final.get("subsets", []), "final.subsets", "a list of objects of numbers")
    if "metrics" in final:
        _metric_table(final["metrics"], "final.metrics")
    if "aux" in final:
        _object(final["aux"], "final.aux")
    if final.get("evaluated") is not None:
        evaluated = _object(final["evaluated"], "final.evaluated")
        _check(_STR, evaluated.get("checkpoint"), "final.evaluated.checkpoint", "a string")
        for key in ("epoch", "step"):
            _check(_NUM, evaluated.get(key), f"final.evaluated.{key}", "a number")


def _history(history: dict[str, Any]) -> None:
    for key in ("probes", "epochs", "loss"):
        for i, entry in enumerate(_list(history.get(key, []), f"history.{key}")):
            where = f"history.{key}.{i}"
            entry = _object(entry, where)
            numbers = {"probes": ("step", "epoch", "fraction"), "epochs": ("epoch", "step",
                       "val_acc"), "loss": ("step", "loss", "lr", "reg")}[key]
            for name in numbers:
                _check(_NUM, entry.get(name), f"{where}.{name}", "a number")
            if key == "probes":
                _metric_table(entry.get("metrics", {}), f"{where}.metrics")
                _check(_NUM_MAP, entry.get("zeroshot", {}), f"{where}.zeroshot",
                       "an object of numbers")


def _zeroshot(zeroshot: dict[str, Any]) -> None:
    for task, z in zeroshot.items():
        z = _object(z, f"zeroshot.{task}")
        for key in ZEROSHOT_NUMBERS:
            _check(_NUM, z.get(key), f"zeroshot.{task}.{key}", "a number")


def _loose(annotation: Any) -> Any:
    """``annotation`` with every ``Literal`` choice widened to its type (str): a record of a
    method or option this version does not know is still readable."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        kinds = tuple({type(a) for a in args})
        return kinds[0] if len(kinds) == 1 else Union[kinds]  # noqa: UP007
    if origin is typing.Annotated:
        return _loose(args[0])
    if origin in (Union, types.UnionType):
        return Union[tuple(_loose(a) for a in args)]  # noqa: UP007
    if origin is list:
        return list[_loose(args[0])]
    return annotation


@functools.cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter:
    return TypeAdapter(_loose(model.model_fields[name].annotation), config=_STRICT)


def _model_in(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """``("one", M)`` for a section ``M``, ``("optional", M)`` for ``M | None``,
    ``("map", M)`` for ``dict[str, M]``; None for a plain field."""
    def is_model(a: Any) -> bool:
        return isinstance(a, type) and issubclass(a, BaseModel)

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if is_model(annotation):
        return "one", annotation
    if origin in (Union, types.UnionType):
        models = [a for a in args if is_model(a)]
        if len(models) == 1 and len(args) == 2 and type(None) in args:
            return "optional", models[0]
    if origin is dict and is_model(args[1]):
        return "map", args[1]
    return None


def _config(config: dict[str, Any], model: type[BaseModel], where: str) -> None:
    """Each key of ``config`` that ``model`` declares has its field's type; sections are
    checked field by field (their validators, which may read datasets, are not run)."""
    for name, value in config.items():
        field = model.model_fields.get(name)
        if field is None:  # a key of another version, or a measured checkpoint's own
            continue
        section = _model_in(field.annotation)
        if section is not None:
            kind, sub = section
            if value is None and kind == "optional":
                continue
            items = {"": value} if kind != "map" else _object(value, f"{where}.{name}")
            for key, item in items.items():
                at = f"{where}.{name}" + (f".{key}" if key else "")
                _config(_object(item, at), sub, at)
        else:
            annotation = field.annotation
            loose = _loose(annotation)
            _check(_field_adapter(model, name), value, f"{where}.{name}",
                   "a " + (loose.__name__ if isinstance(loose, type) else str(loose)))


def problem(record: dict[str, Any]) -> str | None:
    """The first field of ``record`` (a parsed record.json with every top-level key) whose
    type downstream readers could not use, described; None if all are usable."""
    from attndrift.config import RunConfig

    try:
        for key in ("run_id", "status"):
            _check(_STR, record[key], key, "a string")
        for key in SECTIONS:
            _object(record[key], key)
        for key in ("guard", "sanity", "robustness"):
            if record.get(key) is not None:
                _object(record[key], key)
        if record.get("warnings") is not None:
            _check(_STRS, record["warnings"], "warnings", "a list of strings")
        _config(record["config"], RunConfig, "config")
        _final(record["final"])
        _zeroshot(record["zeroshot"])
        _history(record["history"])
        _metric_table(record["baseline"], "baseline", ("aux", "zeroshot_subset"))
    except _Bad as bad:
        return str(bad)
    return None
