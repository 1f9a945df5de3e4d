"""Adaptation methods and regularizers, declared once each (torch-free metadata).

A method is one `MethodSpec` in `METHODS`: its name, label, colour, sort rank, the config keys
it reads (its builder's keyword arguments, so every other method-specific key is inert for its
setting), its interpolation scheme and what it trains. How it is built on a model lives in
`attndrift.models.adapt`, registered under the same name (`adapt.register_method`); a test
checks that the two registries name the same methods. A regularizer is one `RegularizerSpec`
in `REGULARIZERS` here (label, the ``regularizer.*`` keys it reads, figure style) and one loss
entry in `attndrift.regularizers` (how the training loop applies it).

The analysis and the report read this module, never the model code: it imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The method every contrast is read against (the study's baseline).
REFERENCE_METHOD = "full_ft"


def short_number(value: Any) -> str:
    """1e-4 -> '1e-4', 3e-05 -> '3e-5', 0.001 -> '1e-3', 0.01 -> '0.01', 16.0 -> '16'."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    if value != 0 and not 1e-2 <= abs(value) < 1e4:
        mant, exp = f"{value:.2e}".split("e")
        return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{value:.4g}"


def _value(value: Any) -> str:
    """A config value in a label: 16.0 -> '16', ('q_proj', 'v_proj') -> 'q+v'."""
    if isinstance(value, tuple | list):
        return "+".join(str(v).removesuffix("_proj") for v in value)
    return short_number(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class MethodSpec:
    """One adaptation method.

    ``kwargs`` maps its builder's keyword arguments to the dotted config keys they are read
    from: these keys are the method's own part of a run's setting, every other method-specific
    key (config role ``method``) is inert for it. ``describe(flat, shown)`` labels a setting of
    it from its dotted factors; ``shown`` are the keys that vary among the settings labelled
    together (a key always shown is shown whatever ``shown`` says).
    """

    name: str
    label: str
    summary: str  # what trains, for the config reference
    color: str
    rank: int  # order in tables and legends
    scheme: str  # interpolation toward the pretrained model (`attndrift.interpolate`)
    kwargs: Mapping[str, str] = field(default_factory=dict)
    describe: Callable[[Mapping[str, Any], set[str]], str] | None = None
    projection: bool | str = True  # visual projection trains: a bool, or the key deciding it

    @property
    def reads(self) -> tuple[str, ...]:
        """The method-specific config keys (dotted) this method reads."""
        return tuple(self.kwargs.values())

    def label_of(self, flat: Mapping[str, Any], shown: set[str] = frozenset()) -> str:
        return self.describe(flat, set(shown)) if self.describe else self.label

    def trains_projection(self, flat: Mapping[str, Any]) -> bool:
        if isinstance(self.projection, bool):
            return self.projection
        return bool(flat.get(self.projection, True))


METHODS: dict[str, MethodSpec] = {}


def register_method_spec(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} registered twice")
    METHODS[spec.name] = spec
    return spec


def method_spec(name: Any) -> MethodSpec | None:
    return METHODS.get(str(name))


def _lora_describe(prefix: str) -> Callable[[Mapping[str, Any], set[str]], str]:
    def describe(f: Mapping[str, Any], shown: set[str]) -> str:
        part = f"{prefix} r={_value(f.get('lora.r'))}"
        if "lora.alpha" in shown:
            part += f" α={_value(f.get('lora.alpha'))}"
        targets = f.get("lora.targets")
        if "lora.targets" in shown or (targets is not None
                                       and sorted(targets) != ["q_proj", "v_proj"]):
            part += f" ({_value(targets)})"
        if "lora.dropout" in shown:
            part += f" dropout={_value(f.get('lora.dropout'))}"
        if f.get("lora.train_projection", True) is False:
            part += " (proj frozen)"
        return part

    return describe


LORA_KWARGS = {"r": "lora.r", "alpha": "lora.alpha", "dropout": "lora.dropout",
               "targets": "lora.targets", "train_projection": "lora.train_projection"}

register_method_spec(MethodSpec(
    "full_ft", "full FT", "vision tower, visual projection and head", "#c0392b", 0, "wise-ft"))
register_method_spec(MethodSpec(
    "lora", "LoRA", "LoRA on lora.targets, visual projection (lora.train_projection) and head",
    "#2471a3", 1, "lora-scale", LORA_KWARGS, _lora_describe("LoRA"), "lora.train_projection"))
register_method_spec(MethodSpec(
    "freeze", "freeze", "all but the first freeze_layers encoder layers", "#229954", 2,
    "wise-ft", {"layers": "freeze_layers"},
    lambda f, shown: f"freeze {f.get('freeze_layers', '?')}"))
register_method_spec(MethodSpec(
    "linear_probe", "linear probe", "head only", "#7d3c98", 3, "none", projection=False))
register_method_spec(MethodSpec(
    "dora", "DoRA", "DoRA (weight-decomposed LoRA, Liu et al. 2024; PEFT use_dora) on "
    "lora.targets, visual projection (lora.train_projection) and head", "#b7950b", 5,
    "dora-scale", LORA_KWARGS, _lora_describe("DoRA"), "lora.train_projection"))
register_method_spec(MethodSpec(
    "last_block", "last block", "last encoder layer, post-layernorm, visual projection and head "
    "(later protocol)", "#a04000", 4, "wise-ft"))


@dataclass(frozen=True)
class RegularizerSpec:
    """One regularizer: label, the ``regularizer.*`` keys it reads besides ``name`` (the others
    are inert for its setting; an unregularized run reads none), and its figure style."""

    name: str
    label: str
    summary: str  # for the config reference
    reads: tuple[str, ...]
    linestyle: Any
    marker: str
    hatch: str
    attention: bool  # hooks the training forward's attention (cannot be compiled)

    def label_of(self, reg: Mapping[str, Any]) -> str:
        lam = reg.get("lam")
        label = self.label + (f" λ={lam:g}" if isinstance(lam, int | float) else "")
        # the settings that only matter to some regularizers are part of their label
        if "regularizer.ratio" in self.reads and isinstance(reg.get("ratio"), int | float):
            label += f" ratio={reg['ratio']:g}"
        if "regularizer.layers" in self.reads and reg.get("layers") is not None:
            label += f" layers={','.join(str(i) for i in reg['layers'])}"
        return label


REGULARIZERS: dict[str, RegularizerSpec] = {}


def register_regularizer_spec(spec: RegularizerSpec) -> RegularizerSpec:
    if spec.name in REGULARIZERS or spec.name == "none":
        raise ValueError(f"regularizer {spec.name!r} registered twice")
    REGULARIZERS[spec.name] = spec
    return spec


def regularizer_spec(name: Any) -> RegularizerSpec | None:
    return REGULARIZERS.get(str(name))


register_regularizer_spec(RegularizerSpec(
    "apr", "APR", "KL to the pretrained CLS attention",
    ("regularizer.lam", "regularizer.layers"), "--", "*", "///", True))
register_regularizer_spec(RegularizerSpec(
    "entropy_floor", "entropy floor", "hinge below ratio x the pretrained layer entropy",
    ("regularizer.lam", "regularizer.layers", "regularizer.ratio"), ":", "X", "...", True))
register_regularizer_spec(RegularizerSpec(
    "l2sp", "L2-SP", "squared distance to the pretrained weights", ("regularizer.lam",),
    "-.", "P", "xxx", False))
