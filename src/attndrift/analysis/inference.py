"""Inferential tables: run-level multi-seed comparisons, the corrected inference of the study,
and cross-metric correlations.

Units of inference: seeds (runs) in `run_level`; learning-rate settings (seed means) in the
learning-rate trend; layers only in tests labelled exploratory, because the layers of one model
are not independent samples (the original study's error). Holm-Bonferroni adjusts each family.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from attndrift.analysis import stats
from attndrift.analysis.common import (
    SUBSET_MEAN,
    completed,
    context,
    delta,
    drift_note,
    final,
    mean_sd,
    num,
    settings,
    zs,
    zs_tasks,
)
from attndrift.analysis.metadata import SHORT, core_metrics
from attndrift.analysis.runs import (
    LR_KEYS,
    METHOD_KEYS,
    Run,
    factors,
    lr_of,
    matches,
    method_label,
    model_of,
    regularizer_label,
    short_model,
    short_number,
)
from attndrift.analysis.settings import Setting, group_families, key_label, setting_order
from attndrift.analysis.table import Column, Table, make_table, register_table
from attndrift.methods import REFERENCE_METHOD

RUN_LEVEL = "run-level (seeds are the units)"
SETTING_LEVEL = "setting-level (seed means per lr are the units)"
EXPLORATORY = "exploratory (layers of one model as samples)"
_NOT_CONTRASTS = {"train.lr", "data.dataset"}  # lr has the trend test; datasets differ in baseline


def _factor(key: str) -> str:
    if key.startswith("regularizer."):
        return "regularizer"
    if matches(key, METHOD_KEYS):
        return "method"
    return key


_FACTOR_NAMES = {"model": "backbone", "train.weight_decay": "weight decay",
                 "train.epochs": "epochs", "train.batch_size": "batch size"}


def _patch(model: str) -> int:
    m = re.search(r"/(\d+)", short_model(model))
    return int(m.group(1)) if m else 0


def level_label(cfg: dict[str, Any], factor: str) -> str:
    """How one side of a contrast in ``factor`` reads: 'LoRA r=8 α=16', 'ViT-B/16', 'wd 0.1'."""
    if factor == "method":
        return method_label(cfg)
    if factor == "regularizer":
        return regularizer_label(cfg)
    if factor == "model":
        return short_model(model_of(cfg))
    return key_label(factor, factors(cfg).get(factor))


def where_label(cfg: dict[str, Any], *skip: str, other: str = "—") -> str:
    """What the two sides of a contrast share: backbone, dataset, method, regularizer (if any),
    ``other`` settings (the setting's 'other settings' label; '—' for none), lr, leaving out
    the factors in ``skip``."""
    parts = [] if "model" in skip else [short_model(model_of(cfg))]
    parts.append(str((cfg.get("data") or {}).get("dataset")))
    if "method" not in skip:
        parts.append(method_label(cfg))
    if "regularizer" not in skip and regularizer_label(cfg) != "none":
        parts.append(regularizer_label(cfg))
    own = {key_label(k, factors(cfg).get(k)) for k in skip if k in factors(cfg)}
    parts += [x for x in other.split(" · ") if x != "—" and x not in own]
    if "train.lr" not in skip:
        parts.append(f"lr {short_number(lr_of(cfg))}")
    return " · ".join(parts)


def _reference_first(a: Setting, b: Setting, factor: str) -> tuple[Setting, Setting]:
    """Full FT, no regularizer, the coarser backbone (B/32 before B/16, as 002 Table 4) first;
    else setting order."""
    def rank(s: Setting) -> tuple:
        cfg = s.config
        if factor == "method":
            return (cfg.get("method") != REFERENCE_METHOD, setting_order(cfg))
        if factor == "regularizer":
            return (regularizer_label(cfg) != "none", setting_order(cfg))
        if factor == "model":
            return (-_patch(model_of(cfg)), model_of(cfg).casefold())
        return (setting_order(cfg),)

    return (a, b) if rank(a) <= rank(b) else (b, a)


def contrasts(runs: Sequence[Run], min_seeds: int = 2) -> list[tuple[str, Setting, Setting]]:
    """Pairs of settings with >= ``min_seeds`` completed seeds each that differ in exactly one
    factor (method, regularizer, backbone, or one other config key; not lr or dataset). The
    reference (full FT, no regularizer, B/32) comes first."""
    groups = [s for s in settings(runs) if len(s.completed) >= min_seeds]
    out = []
    for a, b in itertools.combinations(groups, 2):
        ka, kb = dict(a.key), dict(b.key)
        diff = {_factor(k) for k in set(ka) | set(kb) if ka.get(k) != kb.get(k)}
        if len(diff) != 1 or diff & _NOT_CONTRASTS:
            continue
        factor = diff.pop()
        out.append((factor, *_reference_first(a, b, factor)))
    return out


def _outcomes(tasks: Sequence[str], drift: str) -> list[tuple[str, str, Any]]:
    out = [(f"Δ {SHORT.get(m, m)} %", "pct", lambda r, m=m: delta(r, m, drift))
           for m in core_metrics()]
    out.append(("best val acc %", "acc", lambda r: num(final(r).get("best_val_acc"))))
    out.append(("test acc %", "acc", lambda r: num(final(r).get("test_acc"))))
    out += [(f"zero-shot {t} %", "acc", lambda r, t=t: zs(r, t)) for t in tasks]
    return out


def _contrast_row(a: list[Run], b: list[Run], get: Any) -> dict[str, Any]:
    xa, xb = [get(r) for r in a], [get(r) for r in b]
    (ma, sa), (mb, sb) = mean_sd(xa), mean_sd(xb)
    w = stats.welch(xa, xb)
    return {"n": f"{sum(map(math.isfinite, xa))} vs {sum(map(math.isfinite, xb))}",
            "mean_a": ma, "sd_a": sa, "mean_b": mb, "sd_b": sb, "t": w.statistic,
            "p": w.pvalue, "d": stats.cohens_d(xa, xb).statistic,
            "p_mw": stats.mann_whitney(xa, xb).pvalue}


def sample_size_note(rows: Sequence[dict[str, Any]]) -> str:
    """What the seeds per side allow, computed from the rows' "n" ("3 vs 3"): the smallest
    two-sided exact Mann-Whitney p, 2 / C(na + nb, na) (no ties), and, with equal sides, that
    Welch t = d sqrt(n / 2) (so t equals Cohen's d at 2 vs 2: not an error)."""
    sizes = sorted({tuple(int(x) for x in str(r["n"]).split(" vs ")) for r in rows
                    if " vs " in str(r.get("n", ""))})
    parts = []
    for na, nb in sizes:
        if na < 1 or nb < 1:
            continue
        part = f"{na} vs {nb} seeds: smallest Mann-Whitney p {2 / math.comb(na + nb, na):.3g}"
        if na == nb:
            part += (", Welch t = d·√(n/2)" + (" = Cohen's d" if na == 2 else ""))
        parts.append(part)
    return ("; ".join(parts) + ".") if parts else ""


def _holm_by(rows: list[dict[str, Any]], key: str) -> None:
    for value in {r[key] for r in rows}:
        family = [r for r in rows if r[key] == value]
        for r, adj in zip(family, stats.holm([r["p"] for r in family]), strict=True):
            r["p_holm"] = float(adj)


def _as_percent(rows: list[dict[str, Any]]) -> None:
    for r in rows:  # accuracy means read as %, drift already in %
        if r.pop("fmt") == "acc":
            for k in ("mean_a", "sd_a", "mean_b", "sd_b"):
                r[k] = 100 * r[k]


_CONTRAST_COLS = (Column("n", "seeds A vs B"), Column("outcome", "outcome"),
                  Column("mean_a", "mean A", "f2", "sd_a"),
                  Column("mean_b", "mean B", "f2", "sd_b"), Column("t", "Welch t", "num"),
                  Column("p", "Welch p", "p"), Column("p_holm", "Holm p", "p"),
                  Column("d", "Cohen's d", "num"), Column("p_mw", "Mann-Whitney p", "p"))


@register_table("run_level", "statistics", order=20)
def run_level(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    tasks, rows, ctx = zs_tasks(completed(runs)), [], context(runs)
    for factor, a, b in sorted(contrasts(runs), key=lambda c: (setting_order(c[1].config),
                                                              c[0], setting_order(c[2].config))):
        where = where_label(a.config, factor, other=ctx.other[a.key])
        for label, fmt, get in _outcomes(tasks, drift):
            row = {"where": where, "factor": factor,
                   "factor_label": _FACTOR_NAMES.get(factor, factor),
                   "a": level_label(a.config, factor), "b": level_label(b.config, factor),
                   "outcome": label, "fmt": fmt, "members": (
                       tuple(str(r.path) for r in a.completed),
                       tuple(str(r.path) for r in b.completed))}
            row.update(_contrast_row(a.completed, b.completed, get))
            rows.append(row)
    _holm_by(rows, "outcome")  # Holm within each outcome's family of contrasts
    _as_percent(rows)
    cols = (Column("where", "shared setting"), Column("factor_label", "factor"), Column("a", "A"),
            Column("b", "B"), *_CONTRAST_COLS)
    return make_table("run_level", "Run-level multi-seed comparisons",
                      "Settings that differ in one factor (method, regularizer, backbone or one "
                      "other setting; same dataset and lr, named under 'shared setting'), each "
                      f"with two or more completed seeds; {RUN_LEVEL}. Means ± sample sd; Welch "
                      "t test (two-sided), Cohen's d (A - B over the pooled sd), Mann-Whitney U "
                      f"(two-sided; exact without ties). {sample_size_note(rows)} Holm p adjusts "
                      f"across the contrasts of each outcome. {drift_note(drift)}", cols, rows,
                      "no two settings with two or more completed seeds differ in one factor")


@register_table("method_lr_contrasts", "statistics", order=30)
def method_lr_contrasts(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    """002 Table 6: full FT vs another method where they differ in the lr as well (e.g. full FT
    at 1e-5 vs LoRA at 1e-4), over seeds, on Δ entropy."""
    rows, ctx = [], context(runs)
    for fam in group_families(runs, LR_KEYS + METHOD_KEYS):
        groups = [s for s in fam.settings if len(s.completed) >= 2]
        for a, b in itertools.combinations(groups, 2):
            a, b = _reference_first(a, b, "method")
            if (a.config.get("method") != REFERENCE_METHOD
                    or b.config.get("method") == REFERENCE_METHOD
                    or lr_of(a.config) == lr_of(b.config)):
                continue
            row = {"where": where_label(a.config, "method", "train.lr", other=ctx.other[a.key]),
                   "a": f"{method_label(a.config)} lr {short_number(lr_of(a.config))}",
                   "b": f"{method_label(b.config)} lr {short_number(lr_of(b.config))}",
                   "outcome": "Δ entropy %", "fmt": "pct",
                   "members": (tuple(str(r.path) for r in a.completed),
                               tuple(str(r.path) for r in b.completed))}
            row.update(_contrast_row(a.completed, b.completed,
                                     lambda r: delta(r, "entropy", drift)))
            rows.append(row)
    _holm_by(rows, "outcome")
    _as_percent(rows)
    cols = (Column("where", "shared setting"), Column("a", "A"), Column("b", "B"),
            *_CONTRAST_COLS)
    return make_table("method_lr_contrasts", "Method contrasts at different learning rates",
                      "As the matched-LR preprint's run-level follow-up (002 Table 6, e.g. full "
                      "FT at 1e-5 vs LoRA at 1e-4): full FT vs each other method of the same "
                      "backbone, dataset and other settings where the two also differ in lr "
                      f"(same-lr pairs are in the run-level table); {RUN_LEVEL}. Welch t, "
                      f"Cohen's d, Mann-Whitney U; {sample_size_note(rows)} Holm across all "
                      "rows. Method and lr change together, so a difference is not the effect "
                      "of either. "
                      f"{drift_note(drift)}", cols, rows,
                      "no full FT and other-method settings (two or more seeds each) of one "
                      "backbone and dataset at different learning rates")


def _seed_mean_layers(group: Sequence[Run], values: Any) -> np.ndarray:
    """Per-layer seed means of ``values(run) -> list`` (layers all runs have), NaN-safe."""
    per_run = [values(r) for r in group]
    width = min((len(p) for p in per_run), default=0)
    if width == 0:
        return np.zeros(0)
    arr = np.array([[num(v) for v in p[:width]] for p in per_run], dtype=float)
    ok = np.isfinite(arr)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok.any(axis=0), np.where(ok, arr, 0).sum(axis=0) / ok.sum(axis=0),
                        np.nan)


def _delta_layers(r: Run) -> list:
    return (final(r).get("delta_pct_layers") or {}).get("entropy") or []


def _entropy_layers(r: Run) -> list:
    return ((final(r).get("metrics") or {}).get("entropy") or {}).get("layers") or []


def _row(family: str, comparison: str, res: stats.TestResult, level: str,
         note: str = "", d: float = math.nan) -> dict[str, Any]:
    n = res.n if isinstance(res.n, int) else " vs ".join(map(str, res.n))
    return {"family": family, "comparison": comparison, "test": res.test, "level": level,
            "n": n, "statistic": res.statistic, "p": res.pvalue, "d": d, "note": note}


def _lr_trend_rows(runs: Sequence[Run], drift: str) -> list[dict[str, Any]]:
    rows = []
    for fam in group_families(runs, LR_KEYS):
        sweep = [s for s in fam.settings if s.completed]
        if len(sweep) < 3:
            continue
        x = np.log10([lr_of(s.config) for s in sweep])
        y = [mean_sd(delta(r, "entropy", drift) for r in s.completed)[0] for s in sweep]
        seeds = sorted({len(s.completed) for s in sweep})
        for method in ("pearson", "spearman"):
            res = stats.permutation_corr_test(x, y, method)
            rows.append(_row(f"lr trend ({method})", f"log10 lr vs Δ entropy: {fam.label}",
                             res, SETTING_LEVEL, f"{len(sweep)} learning rates; seeds per lr: "
                             f"{'/'.join(map(str, seeds))}"))
    return rows


def _regularizer_rows(runs: Sequence[Run], drift: str) -> list[dict[str, Any]]:
    """Each regularized setting vs the unregularized one equal in all else: the study's paired
    t over layers of absolute final entropy (seed means; 003 §3.7, exploratory) with Cohen's d
    of those layer values, and next to it the run-level Welch t over seeds."""
    rows, ctx = [], context(runs)
    for fam in group_families(runs, ("regularizer.",)):
        family = [s for s in fam.settings if s.completed]
        refs = [s for s in family if regularizer_label(s.config) == "none"]
        if not refs or len(family) < 2:
            continue
        ref = refs[0]
        ref_layers = _seed_mean_layers(ref.completed, _entropy_layers)
        for g in family:
            if g is ref:
                continue
            label = (f"{regularizer_label(g.config)} vs none "
                     f"({where_label(ref.config, 'regularizer', other=ctx.other[ref.key])})")
            layers = _seed_mean_layers(g.completed, _entropy_layers)
            if layers.size and layers.size == ref_layers.size and layers.size >= 2:
                rows.append(_row("regularizer, per layer", label,
                                 stats.paired_t(layers, ref_layers), EXPLORATORY,
                                 "paired over layers of the absolute final entropy (seed "
                                 "means), as the study ran it; d of those layer values",
                                 stats.cohens_d(layers, ref_layers).statistic))
            if len(g.completed) >= 2 and len(ref.completed) >= 2:
                xa = [delta(r, "entropy", drift) for r in g.completed]
                xb = [delta(r, "entropy", drift) for r in ref.completed]
                rows.append(_row("regularizer, run-level", label, stats.welch(xa, xb),
                                 RUN_LEVEL, "Δ entropy of each seed",
                                 stats.cohens_d(xa, xb).statistic))
    return rows


def _layer_position_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    rows = []
    for s in settings(runs):
        layers = _seed_mean_layers(s.completed, _delta_layers)
        if layers.size < 6:  # three groups of at least two layers
            continue
        thirds = np.array_split(layers, 3)
        rows.append(_row("layer position", f"early vs middle vs late layers: {s.label}",
                         stats.anova_oneway(*thirds), EXPLORATORY,
                         "per-layer Δ entropy (seed means, probe subset 0) in three contiguous "
                         "layer groups"))
    return rows


@register_table("inference", "statistics", order=40)
def corrected_inference(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    rows = (_lr_trend_rows(runs, drift) + _regularizer_rows(runs, drift)
            + _layer_position_rows(runs))
    _holm_by(rows, "family")
    cols = (Column("family", "family"), Column("comparison", "comparison"),
            Column("level", "inference"), Column("n", "n"),
            Column("statistic", "statistic", "num"), Column("p", "p", "p"),
            Column("p_holm", "Holm p (family)", "p"), Column("d", "Cohen's d", "num"),
            Column("test", "test"), Column("note", "note"))
    return make_table("inference", "Corrected inference",
                      "The study's corrected statistics recomputed from the store: the "
                      "learning-rate trend by exact permutation correlation (all n! pairings for "
                      "n <= 8) within each family of settings equal but for the lr; each "
                      "regularizer vs no regularizer, per layer as the study ran it "
                      "(exploratory) next to the run-level test; and layer position. Holm p "
                      "adjusts within each family. Rows marked exploratory treat layers of one "
                      "model as samples and are descriptive only; method contrasts over seeds "
                      f"are in the run-level table. {drift_note(drift)}", cols, rows,
                      "needs three or more learning rates of one setting, a regularized run "
                      "next to an unregularized one, or a model with six or more layers")


def outcome_columns(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> dict[str, list[float]]:
    """Run-level outcomes of the completed runs, by display name (for correlations)."""
    done = completed(runs)
    data = {f"Δ {SHORT.get(m, m)}": [delta(r, m, drift) for r in done] for m in core_metrics()}
    data["best val acc"] = [num(final(r).get("best_val_acc")) for r in done]
    data["test acc"] = [num(final(r).get("test_acc")) for r in done]
    for t in zs_tasks(done):
        data[f"retained {t}"] = [zs(r, t, "retention_pct") for r in done]
    return data
