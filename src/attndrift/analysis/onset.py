"""Training dynamics from a record's probe history: drift trajectories and collapse onset.

The study called "collapse onset" the first point in training where mean CLS entropy is more
than 1% below the pretrained value (its Table 3.9: 7% of training at lr 1e-4, never at 1e-5).
Here that point is the first probe whose drift falls below the threshold, as a fraction of all
training steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from attndrift.signals import drift_pct  # the one drift formula (re-exported here)

__all__ = ["ONSET_THRESHOLD_PCT", "collapse_onset", "drift_pct", "layer_trajectory",
           "mean_trajectory", "peak_velocity", "trajectory"]

ONSET_THRESHOLD_PCT = -1.0


def trajectory(record: dict[str, Any], metric: str = "entropy") -> tuple[np.ndarray, np.ndarray]:
    """``(fractions, drift %)`` of the layer-mean ``metric`` at each probe, starting at (0, 0).

    Drift is relative to the record's pretrained baseline, as in ``final.delta_pct``.
    """
    base = (record.get("baseline") or {}).get("mean", {}).get(metric)
    fractions, deltas = [0.0], [0.0 if base is not None else math.nan]
    for probe in (record.get("history") or {}).get("probes", []):
        value = (probe.get("metrics") or {}).get("mean", {}).get(metric)
        fractions.append(float(probe.get("fraction", math.nan)))
        deltas.append(drift_pct(value, base))
    return np.asarray(fractions), np.asarray(deltas)


def layer_trajectory(record: dict[str, Any], metric: str = "entropy") -> np.ndarray:
    """Per-layer drift % at each probe: ``[n_probes, L]`` (NaN where a value is missing)."""
    base = (record.get("baseline") or {}).get(metric, {}).get("layers") or []
    rows = []
    for probe in (record.get("history") or {}).get("probes", []):
        layers = (probe.get("metrics") or {}).get(metric, {}).get("layers") or []
        rows.append([drift_pct(a, b) for a, b in zip(layers, base, strict=False)])
    width = max((len(r) for r in rows), default=0)
    return np.array([r + [math.nan] * (width - len(r)) for r in rows], dtype=float).reshape(
        len(rows), width)


def collapse_onset(fractions: Sequence[float], delta_pct: Sequence[float],
                   threshold: float = ONSET_THRESHOLD_PCT) -> float | None:
    """First fraction of training at which drift falls below ``threshold`` %; None if never."""
    for f, d in zip(fractions, delta_pct, strict=True):
        if d is not None and math.isfinite(d) and d < threshold:
            return float(f)
    return None


def peak_velocity(fractions: Sequence[float], delta_pct: Sequence[float]) -> float:
    """The steepest change between consecutive probes, in drift % per unit of training (signed:
    the largest in magnitude). NaN with fewer than two probes."""
    f, d = np.asarray(fractions, dtype=float), np.asarray(delta_pct, dtype=float)
    df = np.diff(f)
    ok = (df > 0) & np.isfinite(np.diff(d))
    if not ok.any():
        return math.nan
    slopes = np.diff(d)[ok] / df[ok]
    return float(slopes[np.argmax(np.abs(slopes))])


def mean_trajectory(records: Sequence[dict[str, Any]], metric: str = "entropy",
                    atol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seed mean of the drift trajectories of one setting's records: ``(fractions, mean, sd,
    n)``, each [P]. A point is a probe fraction (matched within ``atol``) that any run reached;
    ``n`` says how many runs have a finite value there (a diverged seed stops early), ``sd`` is
    the sample sd (NaN where n < 2). Pass the records of one setting only: the function cannot
    tell settings apart."""
    curves = [trajectory(r, metric) for r in records]
    points: list[float] = []
    for fractions, _ in curves:
        for f in fractions:
            if math.isfinite(f) and not any(abs(f - p) <= atol for p in points):
                points.append(float(f))
    points.sort()
    values = np.full((len(curves), len(points)), np.nan)
    for i, (fractions, deltas) in enumerate(curves):
        for f, d in zip(fractions, deltas, strict=True):
            j = next((j for j, p in enumerate(points) if abs(f - p) <= atol), None)
            if j is not None and math.isfinite(d):
                values[i, j] = d
    ok = np.isfinite(values)
    n = ok.sum(axis=0)
    total = np.where(ok, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
        sq = np.where(ok, (values - mean) ** 2, 0.0).sum(axis=0)
        sd = np.where(n > 1, np.sqrt(sq / np.maximum(n - 1, 1)), np.nan)
    return np.asarray(points), mean, sd, n
