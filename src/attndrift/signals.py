"""The signal spec: every quantity attndrift tracks during training, declared once (no torch).

A *signal* is a number a run records and the analysis reads: the attention metrics the probes
compute (``kind="attention"``, in ``history.probes[i].metrics`` and ``final.metrics``), the
auxiliary analyses (``kind="aux"``, in ``probes[i].aux`` and ``final.aux``), and the signals
derived from them that rank as predictors of forgetting (``kind="derived"``: layer-mean drift,
CKA, loss, accuracy, zero-shot retention on the fixed subsets; `PREDICTORS`). Each entry says
its label, short label, unit, which direction means *more change from the pretrained model*
(``change``) and, for quality signals, which is better (``better``), whether it is measured per
head, how its drift is computed, and what a run must measure for it (``needs``). The probes
loop over `ATTENTION`; the tables, compare and the report read labels and directions from here;
`read_signal` reads any signal from a record's probe entry.

How to add a signal
-------------------
- An attention metric: add a `Signal(kind="attention", ...)` to ``_ATTENTION`` below and its
  tensor function to ``attndrift.probes.metrics`` (``PER_MAP`` for a per-(image, head) value,
  ``PER_LAYER`` for one value per layer). The record (per layer, per head, drift), the tables,
  ``attndrift compare``, the trajectories and baseline figures and the predictor signals
  (``d_<name>``, ``abs_d_<name>``) follow; a test loops over `ATTENTION` and checks each.
- An auxiliary metric: compute it in ``attndrift.evaluate.auxiliary_metrics`` and add a
  `Signal(kind="aux", ...)` under the key it writes.
- A derived signal: add a `Signal(kind="derived", ...)` to ``_DERIVED`` and its reader
  ``(record, probe, task) -> float`` (NaN where not measured) to ``_READERS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ATTENTION", "ATTENTION_SAMPLES", "PREDICTORS", "SIGNALS", "Signal", "attention_names",
           "change_score", "drift_pct", "final_probe", "read_signal", "signals_of"]  # fmt: skip

# Probe images whose CLS maps a run saves (``attention.safetensors``) for the heatmap overlays.
ATTENTION_SAMPLES = 8

Kind = Literal["attention", "aux", "derived"]
# Which values mean more change from the pretrained model: "higher" or "lower"; "away" for a
# raw attention metric (farther from its pretrained value, in either direction; its signed drift
# ``d_<name>`` counts in the metric's collapse direction).
Change = Literal["higher", "lower", "away"] | None
# What a run must measure: attention probes, the auxiliary "cka" / "drift" / "rollout" metrics
# (probe.aux, probe.aux_every), zero-shot on the fixed subsets (probe.zeroshot_every), the
# loss log, epoch ends, the config, or the end of training only (test accuracy).
Needs = Literal["attention", "cka", "drift", "rollout", "zeroshot", "loss", "epochs", "config",
                "end"]
# How a metric's drift from the pretrained model is computed: "relative" = `drift_pct` of the
# layer mean (002 §3.2 eq. 2); "none" = the signal is itself a comparison with the pretrained.
Drift = Literal["relative", "none"]


@dataclass(frozen=True)
class Signal:
    """One tracked quantity. ``meaning`` says in words what a higher value means."""

    name: str
    label: str
    short: str
    unit: str
    meaning: str
    kind: Kind
    change: Change = "away"
    better: Literal["higher", "lower"] | None = None
    per_head: bool = False
    drift: Drift = "none"
    per_task: bool = False  # one value per zero-shot transfer task (read with ``task=``)
    # attention metrics: the direction of attention collapse (concentration on fewer patches),
    # which is also the direction of "more change" of the metric's signed drift
    collapse: Literal["higher", "lower"] | None = None
    # what a run must measure for the signal to exist at a training probe
    needs: Needs = "attention"


def drift_pct(adapted: float | None, pretrained: float | None) -> float:
    """The study's drift, ``100 * (adapted - pretrained) / pretrained`` (002 §3.2 eq. 2), of
    plain numbers. NaN when it is undefined: a missing value (None), a non-finite one, or a
    pretrained value of 0 (a relative change from 0 has no size; records write NaN as null)."""
    if not isinstance(adapted, int | float) or not isinstance(pretrained, int | float):
        return math.nan
    a, b = float(adapted), float(pretrained)
    if b == 0 or not (math.isfinite(a) and math.isfinite(b)):
        return math.nan
    return 100.0 * (a - b) / b


_ATTENTION = (
    Signal("entropy", "Attention entropy", "entropy", "nats",
           "higher = broader, more diffuse attention", "attention", per_head=True,
           drift="relative", collapse="lower"),
    Signal("erf", "Effective receptive field", "ERF@0.95", "fraction",
           "higher = 95% of the attention is spread over more of the patches", "attention",
           per_head=True, drift="relative", collapse="lower"),
    Signal("gini", "Gini coefficient", "Gini", "",
           "higher = attention concentrated on fewer patches", "attention", per_head=True,
           drift="relative", collapse="higher"),
    Signal("head_diversity", "Head diversity", "head div.", "",
           "higher = heads attend to more different patches", "attention", drift="relative",
           collapse="lower"),
    Signal("attention_distance", "Mean attention distance (CLS)", "attn. distance", "patches",
           "higher = the CLS attention spreads over patches farther apart (expected distance "
           "between two patches drawn from it, in patch widths)", "attention", per_head=True,
           drift="relative", collapse="lower"),
)  # fmt: skip

_AUX = (
    Signal("rollout_entropy", "rollout entropy", "rollout entropy", "nats",
           "higher = broader attention flow across depth", "aux", needs="rollout"),
    Signal("rollout_erf", "rollout ERF@0.95", "rollout ERF", "fraction", "higher = broader",
           "aux", needs="rollout"),
    Signal("rollout_gini", "rollout Gini", "rollout Gini", "", "higher = more concentrated",
           "aux", needs="rollout"),
    Signal("p2p_entropy", "patch-to-patch entropy", "p2p entropy", "nats",
           "higher = broader patch-to-patch attention", "aux", needs="rollout"),
    Signal("p2p_entropy_layers", "patch-to-patch entropy, layer mean", "p2p entropy (layers)",
           "nats", "per-layer values averaged", "aux", needs="rollout"),
    Signal("p2p_distance", "patch-to-patch mean attention distance", "p2p distance", "patches",
           "higher = patches attend farther away (Dosovitskiy et al. 2021: sum_j a_ij d(i, j) "
           "per patch query, in patch widths)", "aux", needs="rollout"),
    Signal("p2p_distance_layers", "patch-to-patch attention distance, layer mean",
           "p2p distance (layers)", "patches", "per-layer values averaged", "aux",
           needs="rollout"),
    Signal("cka_cls", "mean CKA (CLS)", "CKA (CLS)", "",
           "layer-mean CKA to the pretrained model; 1 = unchanged", "aux", change="lower",
           needs="cka"),
    Signal("cka_patch", "mean CKA (patches)", "CKA (patches)", "",
           "layer-mean CKA to the pretrained model; 1 = unchanged", "aux", change="lower",
           needs="cka"),
    Signal("weight_drift", "relative weight drift", "weight drift", "",
           "relative distance of the weights from the pretrained", "aux", change="higher",
           needs="drift"),
    Signal("weight_drift_layers", "weight drift, layer mean", "weight drift (layers)", "",
           "per-layer values averaged", "aux", change="higher", needs="drift"),
    Signal("embedding_drift", "embedding drift", "embedding drift", "",
           "change of the image embeddings on the probe set (1 - mean cosine)", "aux",
           change="higher", needs="drift"),
)  # fmt: skip


def _derived_attention(m: Signal) -> tuple[Signal, Signal]:
    """The layer-mean drift of an attention metric: signed (more change = its collapse
    direction) and absolute."""
    return (Signal(f"d_{m.name}", f"Δ {m.short}", f"Δ {m.short}", "%",
                   f"drift of the layer-mean {m.short} from the pretrained model", "derived",
                   change=m.collapse),
            Signal(f"abs_d_{m.name}", f"|Δ {m.short}|", f"|Δ {m.short}|", "%",
                   f"size of the drift of the layer-mean {m.short}", "derived",
                   change="higher"))


_DERIVED = (
    *(s for m in _ATTENTION for s in _derived_attention(m)),
    Signal("abs_d_entropy_last", "|Δ entropy|, last layer", "|Δ entropy last|", "%",
           "size of the last layer's entropy drift", "derived", change="higher"),
    Signal("d_entropy_last", "Δ entropy, last layer", "Δ entropy last", "%",
           "drift of the last layer's entropy from the pretrained model", "derived",
           change="lower"),
    Signal("cka_mean", "CKA to pretrained (mean)", "CKA mean", "",
           "linear CKA of the CLS token to the pretrained model, mean over layers; 1 = unchanged",
           "derived", change="lower", needs="cka"),
    Signal("cka_last", "CKA to pretrained (last layer)", "CKA last", "",
           "linear CKA of the last layer's CLS token to the pretrained model; 1 = unchanged",
           "derived", change="lower", needs="cka"),
    Signal("train_loss", "training loss", "train loss", "nats",
           "mean training loss over the last logging interval", "derived", change="lower",
           better="lower", needs="loss"),
    Signal("val_acc", "validation accuracy", "val acc", "fraction",
           "accuracy on the validation split at the latest epoch end", "derived",
           change="higher", better="higher", needs="epochs"),
    Signal("zeroshot_track", "zero-shot track retention", "zs track", "%",
           "zero-shot accuracy on the fixed class-balanced subset of a transfer task, % of the "
           "pretrained model's on the same images (no task: the lowest over the tasks)",
           "derived", change="lower", better="higher", per_task=True, needs="zeroshot"),
    Signal("log_lr", "log10 lr", "log10 lr", "", "the run's learning rate (log10)", "derived",
           change="higher", needs="config"),
    Signal("test_acc", "test accuracy", "test acc", "fraction",
           "accuracy on the test split, read once at the end of training", "derived",
           change="higher", better="higher", needs="end"),
)  # fmt: skip

SIGNALS: dict[str, Signal] = {s.name: s for s in (*_ATTENTION, *_AUX, *_DERIVED)}
ATTENTION: dict[str, Signal] = {s.name: s for s in _ATTENTION}
# Predictors of forgetting (issue 23 item 1; the later protocol's list, later_protocol.md)
PREDICTORS: tuple[str, ...] = (
    *(f"{p}_{m}" for p in ("abs_d", "d") for m in ATTENTION), "abs_d_entropy_last",
    "d_entropy_last", "cka_mean", "cka_last", "embedding_drift", "weight_drift", "train_loss",
    "val_acc", "zeroshot_track", "log_lr", "test_acc")  # fmt: skip


def attention_names() -> tuple[str, ...]:
    """The attention metrics, in display order."""
    return tuple(ATTENTION)


def signals_of(kind: Kind) -> dict[str, Signal]:
    return {n: s for n, s in SIGNALS.items() if s.kind == kind}


def change_score(name: str, value: float) -> float:
    """``value`` oriented so that higher = more change from the pretrained model (``-value`` for
    a "lower" signal; a signed drift counts in its collapse direction); NaN for a raw attention
    metric (whose reference is its pretrained value: read its drift ``d_<name>`` instead)."""
    s = SIGNALS[name]
    if not isinstance(value, int | float) or s.kind == "attention":
        return math.nan
    return {"higher": value, "lower": -value}.get(s.change, math.nan)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else math.nan


def _mean(value: Any) -> float:
    """A number, or the mean of a list of numbers (per-layer values); NaN if absent."""
    if isinstance(value, list):
        vals = [_num(v) for v in value]
        return sum(vals) / len(vals) if vals else math.nan
    return _num(value)


def _last(value: Any) -> float:
    return _num(value[-1]) if isinstance(value, list) and value else math.nan


def _layer_drift(record: Mapping, probe: Mapping, metric: str, layer: int) -> float:
    base = ((record.get("baseline") or {}).get(metric) or {}).get("layers") or []
    now = ((probe.get("metrics") or {}).get(metric) or {}).get("layers") or []
    if not base or len(base) != len(now):
        return math.nan
    return drift_pct(now[layer], base[layer])


def _mean_drift(record: Mapping, probe: Mapping, metric: str) -> float:
    base = ((record.get("baseline") or {}).get("mean") or {}).get(metric)
    return drift_pct(((probe.get("metrics") or {}).get("mean") or {}).get(metric), base)


def _latest(entries: list, step: Any, key: str) -> float:
    """``key`` of the last history entry logged at or before ``step``."""
    if not isinstance(step, int | float):
        return math.nan
    value = math.nan
    for e in entries or []:
        if isinstance(e.get("step"), int | float) and e["step"] <= step:
            value = _num(e.get(key))
    return value


def _zeroshot_track(record: Mapping, probe: Mapping, task: str | None) -> float:
    """Retention % on the task's fixed subset; with no task, the lowest over the tasks."""
    base = (record.get("baseline") or {}).get("zeroshot_subset") or {}
    now = probe.get("zeroshot") or {}
    values = [100.0 * _num(now.get(t)) / _num(base.get(t))
              for t in ([task] if task is not None else sorted(now))
              if _num(base.get(t)) > 0]
    values = [v for v in values if math.isfinite(v)]
    return min(values) if values else math.nan


def _log_lr(record: Mapping, probe: Mapping, task: str | None) -> float:
    lr = _num(((record.get("config") or {}).get("train") or {}).get("lr"))
    return math.log10(lr) if lr > 0 else math.nan


_Reader = Callable[[Mapping, Mapping, str | None], float]
_READERS: dict[str, _Reader] = {
    **{f"d_{m}": (lambda rec, p, t, m=m: _mean_drift(rec, p, m)) for m in ATTENTION},
    **{f"abs_d_{m}": (lambda rec, p, t, m=m: abs(_mean_drift(rec, p, m))) for m in ATTENTION},
    "d_entropy_last": lambda rec, p, t: _layer_drift(rec, p, "entropy", -1),
    "abs_d_entropy_last": lambda rec, p, t: abs(_layer_drift(rec, p, "entropy", -1)),
    "cka_mean": lambda rec, p, t: _mean((p.get("aux") or {}).get("cka_cls")),
    "cka_last": lambda rec, p, t: _last((p.get("aux") or {}).get("cka_cls")),
    "train_loss": lambda rec, p, t: _latest((rec.get("history") or {}).get("loss"),
                                            p.get("step"), "loss"),
    "val_acc": lambda rec, p, t: _latest((rec.get("history") or {}).get("epochs"),
                                         p.get("step"), "val_acc"),
    "zeroshot_track": _zeroshot_track,
    "log_lr": _log_lr,
    "test_acc": lambda rec, p, t: _num(p.get("test_acc")),  # only `final_probe` carries it
}


def read_signal(record: Mapping[str, Any], probe: Mapping[str, Any], name: str,
                task: str | None = None) -> float:
    """The value of signal ``name`` at one probe of a run: ``probe`` is an entry of
    ``record["history"]["probes"]`` (or `final_probe`), ``record`` gives the pretrained
    baseline and the loss/epoch history. NaN where the probe did not measure it (e.g. an aux
    signal between ``probe.aux_every`` probes); ``task`` names the transfer task of a
    per-task signal. Unknown names raise `KeyError`."""
    s = SIGNALS[name]
    if s.kind == "attention":
        return _num(((probe.get("metrics") or {}).get("mean") or {}).get(name))
    if s.kind == "aux":
        return _mean((probe.get("aux") or {}).get(name))
    return float(_READERS[name](record, probe, task))


def final_probe(record: Mapping[str, Any]) -> dict[str, Any]:
    """The end of training as one probe entry: the last history probe (the final step always
    is one), with the final auxiliary metrics (measured on the same probe images after the last
    step; the subset CVs left out) and the test accuracy."""
    probes = (record.get("history") or {}).get("probes") or []
    last = dict(probes[-1]) if probes else {}
    final = record.get("final") or {}
    aux = {k: v for k, v in (final.get("aux") or {}).items() if k != "subset_cv"}
    last["aux"] = {**(last.get("aux") or {}), **aux}
    last["test_acc"] = final.get("test_acc")
    last.setdefault("step", final.get("step"))
    return last
