"""Which signal predicts forgetting, and how early (the later protocol's predictor analysis).

For every backbone and transfer task, every tracked signal (`attndrift.tracked.SIGNALS`) is read
at the end of training and at early points (after the first epoch, and at a share of training,
`EARLY_FRACTION`) and ranked by its Spearman ρ with the run's final zero-shot retention
(``zeroshot[task].retention_pct``, the whole test split), as the later protocol did over its 48
runs: each run is one point (a correlation across runs does not treat the seeds of a setting as
replicates of one another). Beside it: ρ over setting means (seed means; one point per setting),
the mean |ρ| within each dataset and within each dataset × method, and a bootstrap 95% CI of |ρ|
that resamples setting cells (all runs of a setting together, never runs as if independent),
with the paired gap to the leading signal on the same resamples. Runs are pooled only within one
backbone; runs stopped by their guard are left out (their training was cut short).

Reads records only.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from attndrift.analysis.common import SUBSET_MEAN
from attndrift.analysis.runs import Run, dataset_of, method_label, model_of, setting_key
from attndrift.analysis.runs import short_model as _short
from attndrift.analysis.table import (
    Column,
    Table,
    make_table,
    register_summary,
    register_table,
)
from attndrift.tracked import SIGNALS, value_at

EARLY_FRACTION = 0.25  # the configurable early point, a share of training (default)
_EARLY = contextvars.ContextVar("early_fraction", default=EARLY_FRACTION)
BOOTSTRAP = 2000  # resamples of setting cells
SEED = 0
MIN_RUNS = 3


def early_fraction() -> float:
    """The early reading point in force: `EARLY_FRACTION` unless `reading_early_at` set
    another (the report's ``--early-fraction``)."""
    return _EARLY.get()


def check_early_fraction(fraction: float) -> None:
    """ValueError (one line) unless ``fraction`` is a share of training, 0 < fraction < 1."""
    if not 0 < fraction < 1:
        raise ValueError(f"early fraction {fraction} is not a share of training; give a "
                         "number between 0 and 1, e.g. 0.25")


@contextlib.contextmanager
def reading_early_at(fraction: float) -> Iterator[None]:
    """Within the block, the tables and figures read the early point at ``fraction`` of
    training (0 < fraction < 1)."""
    check_early_fraction(fraction)
    token = _EARLY.set(fraction)
    try:
        yield
    finally:
        _EARLY.reset(token)


def points(fraction: float | None = None) -> list[tuple[str, tuple[str, float]]]:
    """(label, point) of the reading points: end of training, after epoch 1, at ``fraction``
    (default: `early_fraction`)."""
    fraction = early_fraction() if fraction is None else fraction
    return [("end", ("end", 1.0)), ("epoch 1", ("epoch", 1.0)),
            (f"{fraction:.0%} of training", ("fraction", fraction))]


def guard_stopped(run: Run) -> bool:
    return bool(((run.record or {}).get("guard") or {}).get("stopped"))


def retention(run: Run, task: str) -> float:
    value = (((run.record or {}).get("zeroshot") or {}).get(task) or {}).get("retention_pct")
    return float(value) if isinstance(value, int | float) else math.nan


@dataclass
class Sample:
    """The runs of one backbone and transfer task: their setting cell (index), dataset,
    dataset × method, and final retention."""

    model: str
    task: str
    runs: list[Run]
    cells: np.ndarray
    datasets: list[str]
    methods: list[str]
    y: np.ndarray

    def signal(self, name: str, point: tuple[str, float]) -> np.ndarray:
        return np.array([value_at(r.record, name, point, self.task) for r in self.runs])


def samples(runs: Sequence[Run]) -> list[Sample]:
    """Completed, not guard-stopped runs with a final retention, per backbone × task."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        if not r.ok or guard_stopped(r):
            continue
        for task in sorted((r.record.get("zeroshot") or {}), key=str.casefold):
            if math.isfinite(retention(r, task)):
                groups.setdefault((model_of(r.config), task), []).append(r)
    out = []
    for (model, task), group in sorted(groups.items()):
        keys = [setting_key(r.config) for r in group]
        index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        out.append(Sample(model, task, group, np.array([index[k] for k in keys]),
                          [dataset_of(r.config) for r in group],
                          [f"{dataset_of(r.config)} · {method_label(r.config)}" for r in group],
                          np.array([retention(r, task) for r in group])))
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    """(ρ, two-sided p, n) over the pairs where both are finite; NaN when n < 3 or constant."""
    keep = np.isfinite(x) & np.isfinite(y)
    n = int(keep.sum())
    if n < MIN_RUNS or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return math.nan, math.nan, n
    res = stats.spearmanr(x[keep], y[keep])
    return float(res.statistic), float(res.pvalue), n


def cell_means(x: np.ndarray, y: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per setting cell, the mean of x and of y over its runs where both are finite."""
    keep = np.isfinite(x) & np.isfinite(y)
    ids = sorted(set(cells[keep].tolist()))
    return (np.array([x[keep & (cells == c)].mean() for c in ids]),
            np.array([y[keep & (cells == c)].mean() for c in ids]))


def within_mean_abs(x: np.ndarray, y: np.ndarray, groups: Sequence[str]) -> tuple[float, int]:
    """Mean |ρ| over the groups (datasets, or dataset × method) where ρ is defined, and how
    many groups that is."""
    labels = np.asarray(groups)
    rhos = [abs(spearman(x[labels == g], y[labels == g])[0]) for g in dict.fromkeys(groups)]
    rhos = [r for r in rhos if math.isfinite(r)]
    return (float(np.mean(rhos)) if rhos else math.nan), len(rhos)


def draw_cells(n_cells: int, n_boot: int = BOOTSTRAP, seed: int = SEED) -> np.ndarray:
    """``[n_boot, n_cells]`` indices of the setting cells each bootstrap resample takes."""
    return np.random.default_rng(seed).integers(0, n_cells, size=(n_boot, n_cells))


def weighted_spearman(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Spearman ρ of samples in which point i appears ``w[b, i]`` times, one per row b of
    ``w`` ``[B, n]``: exactly scipy's ρ of the expanded sample (average ranks of ties), computed
    from weighted mid-ranks. x and y must be finite where w > 0."""
    x, y = np.nan_to_num(x), np.nan_to_num(y)

    def midranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        sorted_v = v[order]
        starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
        tied = np.add.reduceat(w[:, order], starts, axis=1)  # [B, groups]: copies per value
        below = np.cumsum(tied, axis=1) - tied  # copies of smaller values
        group = np.cumsum(np.r_[True, sorted_v[1:] != sorted_v[:-1]]) - 1  # sorted pos -> group
        ranks = np.empty_like(w)
        ranks[:, order] = (below + (tied + 1.0) / 2.0)[:, group]
        return ranks

    rx, ry = midranks(x), midranks(y)
    total = w.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        dx = rx - (w * rx).sum(axis=1, keepdims=True) / total
        dy = ry - (w * ry).sum(axis=1, keepdims=True) / total
        cov = (w * dx * dy).sum(axis=1)
        rho = cov / np.sqrt((w * dx * dx).sum(axis=1) * (w * dy * dy).sum(axis=1))
    rho[(total[:, 0] < MIN_RUNS) | ~np.isfinite(rho)] = np.nan
    return rho


def cell_counts(draws: np.ndarray) -> np.ndarray:
    """``[B, n_cells]``: how often each resample drew each cell."""
    counts = np.zeros(draws.shape, dtype=float)
    np.add.at(counts, (np.arange(draws.shape[0])[:, None], draws), 1.0)
    return counts


def bootstrap_abs_rho(x: np.ndarray, y: np.ndarray, cells: np.ndarray, draws: np.ndarray
                      ) -> np.ndarray:
    """|ρ| of each resample: the runs of the drawn setting cells (a cell drawn twice counts its
    runs twice), pairs with a non-finite value left out. ``[B]``. ``draws`` as from
    `draw_cells`, or already counted by `cell_counts` (float)."""
    counts = draws if draws.dtype.kind == "f" else cell_counts(draws)
    ok = (np.isfinite(x) & np.isfinite(y)).astype(float)
    return np.abs(weighted_spearman(x, y, counts[:, cells] * ok[None, :]))


def percentile_ci(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size < 0.5 * values.size or finite.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def rank_sample(sample: Sample, point: tuple[str, float], when: str,
                n_boot: int = BOOTSTRAP) -> list[dict]:
    """One row per signal with a value at ``point``, leader first."""
    draws = cell_counts(draw_cells(int(sample.cells.max()) + 1, n_boot))
    rows, boots = [], {}
    for name, sig in SIGNALS.items():
        x = sample.signal(name, point)
        rho, p, n = spearman(x, sample.y)
        if n == 0:
            continue
        mx, my = cell_means(x, sample.y, sample.cells)
        rho_s, _, n_s = spearman(mx, my)
        ds, n_ds = within_mean_abs(x, sample.y, sample.datasets)
        dms, n_dms = within_mean_abs(x, sample.y, sample.methods)
        boots[name] = bootstrap_abs_rho(x, sample.y, sample.cells, draws)
        lo, hi = percentile_ci(boots[name])
        rows.append({"model": _short(sample.model), "task": sample.task, "when": when,
                     "signal": sig.label, "name": name, "n": n, "rho": rho, "p": p,
                     "abs_rho": abs(rho), "rho_settings": rho_s, "n_settings": n_s,
                     "within_dataset": ds, "n_datasets": n_ds,
                     "within_dataset_method": dms, "n_dataset_methods": n_dms,
                     "ci_lo": lo, "ci_hi": hi})
    ranked = sorted(rows, key=lambda r: -r["abs_rho"] if math.isfinite(r["abs_rho"]) else 1.0)
    if ranked and math.isfinite(ranked[0]["abs_rho"]):
        lead = ranked[0]
        for i, row in enumerate(ranked):
            row["rank"] = i + 1 if math.isfinite(row["abs_rho"]) else None
            row["leader"] = lead["signal"]
            row["gap"] = lead["abs_rho"] - row["abs_rho"]
            row["gap_lo"], row["gap_hi"] = percentile_ci(boots[lead["name"]] - boots[row["name"]])
    return ranked


def predictor_rows(runs: Sequence[Run], fraction: float | None = None,
                   n_boot: int = BOOTSTRAP) -> list[dict]:
    rows = []  # `points` reads the early fraction in force where ``fraction`` is None
    for sample in samples(runs):
        for when, point in points(fraction):
            rows += rank_sample(sample, point, when, n_boot)
    return rows


@register_table("predictors", "predictors", order=10)
def predictors(runs: Sequence[Run], drift: str = SUBSET_MEAN,
               fraction: float | None = None) -> Table:
    """The predictor ranking table (``tables/predictors.csv``)."""
    fraction = early_fraction() if fraction is None else fraction
    cols = (Column("model", "backbone"), Column("task", "zero-shot task"),
            Column("when", "read at"), Column("rank", "rank", "int"),
            Column("signal", "signal"), Column("n", "runs", "int"),
            Column("rho", "Spearman ρ", "num"), Column("p", "p", "p"),
            Column("rho_settings", "ρ, setting means", "num"),
            Column("n_settings", "settings", "int"),
            Column("within_dataset", "mean |ρ| within dataset", "num"),
            Column("within_dataset_method", "mean |ρ| within dataset × method", "num"),
            Column("ci_lo", "|ρ| 95% CI low", "num"), Column("ci_hi", "|ρ| 95% CI high", "num"),
            Column("gap", "gap to leader", "num"), Column("gap_lo", "gap CI low", "num"),
            Column("gap_hi", "gap CI high", "num"))
    return make_table(
        "predictors", "Which signal predicts forgetting, and how early?",
        "Spearman ρ of each tracked signal with the final zero-shot retention of a transfer "
        "task, one point per run (as the later protocol), read at the end of training, after "
        f"epoch 1 and at {fraction:.0%} of training (its last value measured by then), pooled "
        "within one backbone, ranked by |ρ|. p: scipy's (runs treated as independent); "
        "ρ, setting means: one point per setting (seed means). Mean |ρ| within each dataset "
        "and each dataset × method. |ρ| 95% CI: percentile bootstrap over setting cells "
        f"({BOOTSTRAP} resamples; a cell's runs are drawn together), and the paired gap to the "
        "leading signal on the same resamples. Runs stopped by a guard are left out. "
        "Correlational, not causal.",
        cols, predictor_rows(runs, fraction),
        "needs 3 completed runs of one backbone with zero-shot retention")


@register_summary("early_warning")
def early_warning(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> list[str]:
    """The report's first-screen sentences: per backbone and task, the signal that predicted
    the final retention best after epoch 1 (and at the end), the best one that needs no
    transfer data where the leader is the zero-shot track, and signed Δ entropy."""
    rows = [r for r in predictor_rows(runs) if r["when"] in ("end", "epoch 1")
            and math.isfinite(r["rho"])]
    out = []
    for key in dict.fromkeys((r["model"], r["task"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["task"]) == key]
        parts = []
        for when in ("epoch 1", "end"):
            ranked = [r for r in mine if r["when"] == when]
            if not ranked:
                continue
            lead, dh = ranked[0], next((r for r in ranked if r["name"] == "d_entropy"), None)
            text = (f"{'after epoch 1' if when == 'epoch 1' else 'at the end'}: "
                    f"{lead['signal']} (ρ = {lead['rho']:+.2f}, |ρ| 95% CI "
                    f"{lead['ci_lo']:.2f}-{lead['ci_hi']:.2f}, {lead['n']} runs)")
            if SIGNALS[lead["name"]].needs == "zeroshot":
                # the track is the transfer task itself, subsampled: name the best signal a
                # user without the transfer data can watch too
                alt = next((r for r in ranked if SIGNALS[r["name"]].needs != "zeroshot"), None)
                if alt is not None:
                    text += (f"; without transfer data: {alt['signal']} "
                             f"(ρ = {alt['rho']:+.2f})")
            if dh is not None and dh is not lead:
                text += f"; Δ entropy ρ = {dh['rho']:+.2f}"
            parts.append(text)
        out.append(f"{key[0]} → {key[1]}, best predictor of final retention " +
                   "; ".join(parts) + ".")
    stopped = [r for r in runs if guard_stopped(r)]
    if stopped:
        out.append(("1 run stopped by its guard" if len(stopped) == 1 else
                    f"{len(stopped)} runs stopped by their guard")
                   + " (table 'Guarded runs'; left out of the ranking).")
    return out


def ranking_lines(runs: Sequence[Run], top: int = 4) -> list[str]:
    """The ranking in a few lines (what ``make demo`` prints): per backbone, task and reading
    point, the ``top`` signals by |ρ| with final retention, and signed Δ entropy's place."""
    rows = [r for r in predictor_rows(runs) if math.isfinite(r["rho"])]
    out = []
    for key in dict.fromkeys((r["model"], r["task"], r["when"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["task"], r["when"]) == key]
        shown = mine[:top] + [r for r in mine[top:] if r["name"] == "d_entropy"]
        cells = [f"{r['rank']}. {r['signal']} {r['rho']:+.2f}" for r in shown]
        n = max(r["n"] for r in mine)
        out.append(f"{key[0]} → {key[1]}, {key[2]} ({n} runs): " + ", ".join(cells))
    return out
