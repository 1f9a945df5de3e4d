"""Forecast a run's final zero-shot retention from the first epoch (beyond the study).

On a store's finished runs (completed, not stopped by a guard), per backbone and transfer task,
each signal read early (after epoch 1 by default; `attndrift.tracked.value_at`) is mapped to the
final retention by isotonic regression (`scipy.optimize.isotonic_regression`, pool adjacent
violators; increasing or decreasing as the signal's Spearman ρ with retention says; tied values
pooled first; predictions interpolated linearly between the fitted points and held constant
beyond them). The signal is chosen by leave-one-setting-out error: every setting (all its seeds)
is predicted by a map fitted on the other settings, and the signal with the smallest mean
absolute error over the runs wins. A new or running run is then forecast with that map, the
error stated beside it. Too small a store to calibrate (fewer than `MIN_SETTINGS` settings or
`MIN_RUNS` runs) is said plainly, never fitted. Reads records only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import isotonic_regression

from attndrift.analysis.common import SUBSET_MEAN
from attndrift.analysis.predictors import Sample, samples, spearman
from attndrift.analysis.runs import Run, load_run, load_store, model_of, setting_key
from attndrift.analysis.runs import short_model as _short
from attndrift.analysis.table import Column, Table, make_table, register_table
from attndrift.tracked import SIGNALS, value_at

MIN_SETTINGS = 4  # a leave-one-setting-out fit needs at least 3 settings left
MIN_RUNS = 8
EPOCH1 = ("epoch", 1.0)


def fit_isotonic(x: np.ndarray, y: np.ndarray, increasing: bool) -> tuple[np.ndarray, np.ndarray]:
    """The monotone least-squares fit of y on x: ``(x knots ascending, fitted y)``; runs with
    the same x are pooled (their mean, weighted by their count) before fitting."""
    xs, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=y) / counts
    fitted = isotonic_regression(means, weights=counts.astype(float), increasing=increasing).x
    return xs, np.asarray(fitted, dtype=float)


def predict(knots: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The fitted map at x: linear between knots, constant beyond the ends."""
    return np.interp(x, knots[0], knots[1])


def loso_errors(x: np.ndarray, y: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """|prediction - truth| of every run with a finite x, each predicted by a map fitted on the
    runs of the other settings (NaN where fewer than 3 other runs have the signal)."""
    ok = np.isfinite(x) & np.isfinite(y)
    errors = np.full(x.shape, np.nan)
    for cell in np.unique(cells[ok]):
        train = ok & (cells != cell)
        if train.sum() < 3 or np.ptp(x[train]) == 0:
            continue
        rho = spearman(x[train], y[train])[0]
        knots = fit_isotonic(x[train], y[train], not (rho < 0))
        held = ok & (cells == cell)
        errors[held] = np.abs(predict(knots, x[held]) - y[held])
    return errors


@dataclass
class Calibration:
    """The chosen map of one backbone and task, or why there is none (``too_small``)."""

    model: str
    task: str
    point: tuple[str, float]
    n_runs: int
    n_settings: int
    signal: str | None = None
    increasing: bool = True
    knots: tuple[np.ndarray, np.ndarray] | None = None
    error: float = math.nan  # leave-one-setting-out mean absolute error, retention points
    scores: dict[str, float] = field(default_factory=dict)  # signal -> LOSO MAE
    too_small: str | None = None


def _score(sample: Sample, point: tuple[str, float]) -> dict[str, float]:
    scores = {}
    for name, sig in SIGNALS.items():
        if sig.needs == "end":
            continue
        x = sample.signal(name, point)
        errs = loso_errors(x, sample.y, sample.cells)
        covered = np.isfinite(errs)
        # a signal must predict every run that has it, or it would be scored on the easy ones
        if covered.sum() >= MIN_RUNS and covered.sum() == (np.isfinite(x)).sum():
            scores[name] = float(errs[covered].mean())
    return scores


def calibrate(runs: Sequence[Run], point: tuple[str, float] = EPOCH1) -> list[Calibration]:
    """One calibration per backbone and task of the store's finished runs."""
    out = []
    for sample in samples(runs):
        n_set = len(np.unique(sample.cells))
        cal = Calibration(sample.model, sample.task, point, len(sample.runs), n_set)
        if n_set < MIN_SETTINGS or len(sample.runs) < MIN_RUNS:
            cal.too_small = (f"too small to calibrate: {len(sample.runs)} finished runs in "
                             f"{n_set} settings (need {MIN_RUNS} runs in {MIN_SETTINGS} "
                             "settings)")
        else:
            cal.scores = _score(sample, point)
            if not cal.scores:
                cal.too_small = ("too small to calibrate: no signal measured at the point "
                                 f"in {MIN_RUNS} runs (track it during training)")
        if cal.scores:
            cal.signal = min(cal.scores, key=cal.scores.get)
            x = sample.signal(cal.signal, point)
            ok = np.isfinite(x)
            cal.increasing = not (spearman(x[ok], sample.y[ok])[0] < 0)
            cal.knots = fit_isotonic(x[ok], sample.y[ok], cal.increasing)
            cal.error = cal.scores[cal.signal]
        out.append(cal)
    return out


def forecast_run(cal: Calibration, record: dict[str, Any]) -> dict[str, Any]:
    """The forecast of one run's final retention on ``cal.task`` (with notes), from its
    record."""
    out: dict[str, Any] = {"task": cal.task, "signal": cal.signal, "error": cal.error,
                           "prediction": math.nan, "value": math.nan, "note": ""}
    if cal.knots is None:
        out["note"] = cal.too_small or "no calibration"
        return out
    value = value_at(record, cal.signal, cal.point, cal.task)
    out["value"] = value
    if not math.isfinite(value):
        out["note"] = (f"{SIGNALS[cal.signal].label} not measured by {_point(cal.point)} "
                       "(not reached yet, or not tracked)")
        return out
    out["prediction"] = float(predict(cal.knots, np.array([value]))[0])
    lo, hi = cal.knots[0][0], cal.knots[0][-1]
    if value < lo or value > hi:
        out["note"] = (f"outside the calibrated range {lo:.4g}..{hi:.4g}: the forecast is "
                       "the nearest end's")
    final = ((record.get("zeroshot") or {}).get(cal.task) or {}).get("retention_pct")
    if isinstance(final, int | float):
        out["actual"] = float(final)
    return out


def _point(point: tuple[str, float]) -> str:
    return "the end of epoch 1" if point == EPOCH1 else (
        f"epoch {point[1]:g}" if point[0] == "epoch" else f"{point[1]:.0%} of training")


def forecast(runs: Sequence[Run], targets: Sequence[Run], point: tuple[str, float] = EPOCH1
             ) -> list[dict[str, Any]]:
    """Calibrate on ``runs`` and forecast every target run (one row per target and task its
    backbone has a calibration for). A target that is itself in ``runs`` is forecast from a
    calibration without its setting, so the forecast is never in-sample."""
    cache: dict[Any, list[Calibration]] = {}
    rows: list[dict[str, Any]] = []
    paths = {Path(r.path).resolve() for r in runs}
    for target in targets:
        if target.record is None:
            rows.append({"run": target.name, "dir": str(target.path),
                         "note": target.error or "no record"})
            continue
        held = setting_key(target.config) if Path(target.path).resolve() in paths else None
        if held not in cache:
            pool = [r for r in runs if held is None or setting_key(r.config) != held]
            cache[held] = calibrate(pool, point)
        tasks = (target.config.get("data") or {}).get("zeroshot") or []
        mine = [c for c in cache[held] if model_of(target.config) == c.model and c.task in tasks]
        if not mine:
            rows.append({"run": target.name, "dir": str(target.path), "note": "the store has "
                         "no finished runs of this backbone and transfer task to calibrate on"})
        rows += [{"run": target.name, "dir": str(target.path), "status": target.status,
                  **forecast_run(c, target.record),
                  **({"held_out": True} if held is not None else {})} for c in mine]
    return rows


def forecast_lines(store: Path, run_dirs: Sequence[Path], point: tuple[str, float] = EPOCH1
                   ) -> list[str]:
    """``attndrift forecast``: one line per run and task."""
    runs = load_store(store)
    lines = []
    for row in forecast(runs, [load_run(d) for d in run_dirs], point):
        head = f"{row['dir']}" + (f" → {row['task']}" if row.get("task") else "")
        if not math.isfinite(row.get("prediction", math.nan)):
            lines.append(f"{head}: no forecast: {row['note']}")
            continue
        line = (f"{head}: final retention {row['prediction']:.1f}% ± {row['error']:.1f} "
                f"(leave-one-setting-out mean abs. error) from {SIGNALS[row['signal']].label} "
                f"= {row['value']:.4g} at {_point(point)}")
        if "actual" in row:
            line += f"; actual {row['actual']:.1f}%"
        if row.get("held_out"):
            line += "; its setting left out of the calibration"
        lines.append(line + (f" [{row['note']}]" if row["note"] else ""))
    return lines


@register_table("forecast", "predictors", order=40)
def forecast_table(runs: Sequence[Run], drift: str = SUBSET_MEAN,
                   point: tuple[str, float] = EPOCH1) -> Table:
    """The report's calibration table: each signal's leave-one-setting-out error."""
    rows = []
    for cal in calibrate(runs, point):
        base = {"model": _short(cal.model), "task": cal.task, "runs": cal.n_runs,
                "settings": cal.n_settings}
        if cal.too_small:
            rows.append({**base, "signal": "—", "note": cal.too_small})
        ranked = sorted(cal.scores.items(), key=lambda kv: kv[1])
        rows += [{**base, "signal": SIGNALS[name].label, "error": err,
                  "note": "chosen" if name == cal.signal else ""} for name, err in ranked]
    cols = (Column("model", "backbone"), Column("task", "zero-shot task"),
            Column("runs", "runs", "int"), Column("settings", "settings", "int"),
            Column("signal", "signal"), Column("error", "LOSO error (points)", "f2"),
            Column("note", "note"))
    return make_table(
        "forecast", "Forecasting final retention from the first epoch",
        f"Each signal read at {_point(point)} is mapped to the final zero-shot retention by "
        "isotonic regression fitted on the store's finished runs; its error is the mean "
        "absolute error (retention points) when every setting is predicted from the others "
        "(leave one setting out). The smallest error is chosen: `attndrift forecast --store "
        "STORE RUN_DIR` predicts new or running runs with it. Beyond the study.",
        cols, rows, "needs finished runs with zero-shot retention")
