"""What a practitioner picks with the signals: selection utility, the accuracy-retention
frontier, and the runs a guard acted on.

Selection utility (later protocol): per backbone, dataset and transfer task, the candidates are
the runs within ``margin`` points (default 2) of the best validation accuracy; each signal, read
at the end or early, picks the candidate with the least change (`tracked.change`); its regret is
the best retention among the candidates minus the picked run's. The frontier: every setting's
test accuracy against its retention (seed means), the Pareto set marked (no other setting at
least as accurate and as retentive, better in one). Reads records only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from attndrift.analysis.common import SUBSET_MEAN, mean_sd, num
from attndrift.analysis.predictors import guard_stopped, points, retention
from attndrift.analysis.runs import (
    Run,
    dataset_of,
    lr_of,
    method_label,
    model_of,
    short_model,
)
from attndrift.analysis.settings import group_settings
from attndrift.analysis.table import Column, Table, make_table, register_table
from attndrift.tracked import SIGNALS, change, value_at

MARGIN_POINTS = 2.0  # candidates: within this many points of the best validation accuracy


def val_acc(run: Run) -> float:
    fin = (run.record or {}).get("final") or {}
    best = num(fin.get("best_val_acc"))
    return best if math.isfinite(best) and best >= 0 else num(fin.get("val_acc"))


def _strata(runs: Sequence[Run], stopped: bool = False) -> dict[tuple[str, str, str], list[Run]]:
    """Completed runs with a retention per (backbone, dataset, task); guard-stopped runs only
    with ``stopped``."""
    out: dict[tuple[str, str, str], list[Run]] = {}
    for r in runs:
        if not r.ok or (guard_stopped(r) and not stopped):
            continue
        for task in (r.record.get("zeroshot") or {}):
            if math.isfinite(retention(r, task)):
                out.setdefault((model_of(r.config), dataset_of(r.config), task), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: tuple(k.casefold() for k in kv[0])))


def pick(candidates: Sequence[Run], name: str, point: tuple[str, float], task: str
         ) -> Run | None:
    """The candidate with the least change in signal ``name`` at ``point`` (ties: the more
    accurate, then the name); None when no candidate has the value."""
    sig = SIGNALS[name]
    scored = [(change(sig, value_at(r.record, name, point, task)), -val_acc(r), r.name, i)
              for i, r in enumerate(candidates)]
    scored = [s for s in scored if math.isfinite(s[0])]
    return candidates[min(scored)[3]] if scored else None


def selection_rows(runs: Sequence[Run], margin: float = MARGIN_POINTS,
                   fraction: float | None = None) -> list[dict]:
    rows = []
    for (model, dataset, task), group in _strata(runs).items():
        accs = [val_acc(r) for r in group]
        if not any(math.isfinite(a) for a in accs):
            continue
        top = max(a for a in accs if math.isfinite(a))
        cands = [r for r, a in zip(group, accs, strict=True) if a >= top - margin / 100 - 1e-12]
        best = max(retention(r, task) for r in cands)
        base = {"model": short_model(model), "dataset": dataset, "task": task,
                "candidates": len(cands), "best": best}
        rows.append({**base, "when": "—", "signal": "any candidate (expected)",
                     "regret": float(np.mean([best - retention(r, task) for r in cands]))})
        for when, point in points(fraction):
            for name, sig in SIGNALS.items():
                chosen = pick(cands, name, point, task)
                if chosen is None or name == "val_acc":
                    continue
                ret = retention(chosen, task)
                rows.append({**base, "when": when, "signal": sig.label, "run": chosen.name,
                             "val_acc": val_acc(chosen), "retention": ret,
                             "regret": best - ret})
    return rows


@register_table("selection_utility", "predictors", order=20)
def selection_utility(runs: Sequence[Run], drift: str = SUBSET_MEAN,
                      margin: float = MARGIN_POINTS) -> Table:
    cols = (Column("model", "backbone"), Column("dataset", "dataset"),
            Column("task", "zero-shot task"), Column("candidates", "candidates", "int"),
            Column("when", "read at"), Column("signal", "signal picks"),
            Column("run", "picked run"), Column("val_acc", "val acc", "acc"),
            Column("retention", "retention %", "pct0"), Column("best", "best retention %",
                                                               "pct0"),
            Column("regret", "regret (points)", "f2"))
    return make_table(
        "selection_utility", "Selection utility: which run would each signal pick?",
        f"Among the runs within {margin:g} points of the best validation accuracy of their "
        "backbone and dataset (the later protocol's candidates), the run with the least change "
        "in each signal (read at the end or early), its final zero-shot retention and its "
        "regret: the best retention among the candidates minus the picked run's. 'any "
        "candidate' is the expected regret of a pick at random. Guard-stopped runs are left out.",
        cols, selection_rows(runs, margin),
        "needs completed runs with validation accuracy and zero-shot retention")


def pareto(points_xy: Sequence[tuple[float, float]]) -> list[bool]:
    """True where no other point is >= in both coordinates and > in one (NaN: never)."""
    out = []
    for i, (x, y) in enumerate(points_xy):
        if not (math.isfinite(x) and math.isfinite(y)):
            out.append(False)
            continue
        out.append(not any(j != i and a >= x and b >= y and (a > x or b > y)
                           for j, (a, b) in enumerate(points_xy)))
    return out


def frontier_rows(runs: Sequence[Run]) -> list[dict]:
    """Per (backbone, dataset, task), each setting's seed-mean test accuracy and retention."""
    rows = []
    for (model, dataset, task), group in _strata(runs, stopped=True).items():
        settings = group_settings(group)
        stats = []
        for s in settings:
            acc = mean_sd([num((r.record.get("final") or {}).get("test_acc")) for r in s.runs])
            ret = mean_sd([retention(r, task) for r in s.runs])
            stats.append((s, acc, ret))
        front = pareto([(a[0], b[0]) for _, a, b in stats])
        for (s, acc, ret), on in zip(stats, front, strict=True):
            rows.append({"model": short_model(model), "dataset": dataset, "task": task,
                         "setting": s.label, "n": len(s.runs), "test_acc": acc[0],
                         "test_acc_sd": acc[1], "retention": ret[0], "retention_sd": ret[1],
                         "pareto": "yes" if on else "", "guarded": "yes" if any(
                             guard_stopped(r) for r in s.runs) else "",
                         "method": method_label(s.config), "lr": lr_of(s.config),
                         "_method": s.config.get("method")})
    return rows


@register_table("frontier", "predictors", order=30)
def frontier(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    cols = (Column("model", "backbone"), Column("dataset", "dataset"),
            Column("task", "zero-shot task"), Column("setting", "setting"),
            Column("n", "seeds", "int"), Column("test_acc", "test acc", "acc", sd="test_acc_sd"),
            Column("retention", "retention %", "pct0", sd="retention_sd"),
            Column("pareto", "on the frontier"), Column("guarded", "stopped by guard"))
    return make_table(
        "frontier", "Accuracy-retention frontier",
        "Every setting's test accuracy against its final zero-shot retention (mean ± sd over "
        "its seeds), per backbone, dataset and task; 'on the frontier': no other setting is at "
        "least as accurate and as retentive and better in one (the Pareto set). Pick a "
        "learning rate from it.", cols, frontier_rows(runs),
        "needs completed runs with test accuracy and zero-shot retention")


@register_table("guarded_runs", "predictors", order=50)
def guarded_runs(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    """Every run whose config had a guard, and what it did."""
    rows = []
    for r in runs:
        g = (r.record or {}).get("guard")
        if not g:
            continue
        hit = g.get("stopped") or (g.get("crossings") or [None])[0] or {}
        rows.append({"run": r.name, "status": r.status, "signal": SIGNALS[g["signal"]].label
                     if g.get("signal") in SIGNALS else g.get("signal"),
                     "rule": f"{g.get('direction')} {g.get('threshold')}", "action":
                     g.get("action"), "crossings": len(g.get("crossings") or []),
                     "step": hit.get("step"), "fraction": hit.get("fraction"),
                     "value": hit.get("value"),
                     "stopped": "yes" if g.get("stopped") else "no"})
    cols = (Column("run", "run"), Column("status", "status"), Column("signal", "signal"),
            Column("rule", "crosses"), Column("action", "action"),
            Column("crossings", "crossings", "int"), Column("stopped", "stopped"),
            Column("step", "first crossing: step", "int"),
            Column("fraction", "share of training", "acc"), Column("value", "value", "num"))
    return make_table(
        "guarded_runs", "Guarded runs",
        "Runs trained with an early-warning guard (`guard:` in the run config): the signal, "
        "the threshold it had to cross and in which direction, the action, how often it "
        "crossed, and the first crossing (for action stop, where training ended).",
        cols, rows, "no run had a guard")
