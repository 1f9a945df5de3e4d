"""The report's answer, first (issue 22 item 4): per backbone × dataset, which method keeps the
most zero-shot transfer, at what accuracy, with the statistic behind it and its caveats.

Model selection is the study's: each family of settings (a setting without its learning rate)
is taken at its best learning rate by mean best validation accuracy, never the test split. Among
those, the one with the highest mean zero-shot retention (% of the pretrained accuracy, averaged
over the transfer tasks, per seed) is named, against the next best by Welch's t test over the
seeds (run-level: seeds are the units). Caveats say what weakens the call: seeds that did not
converge (003 §4.5's check) or did not complete, a single seed (no test), a gap within seed
noise (p ≥ 0.05), an accuracy below the most accurate family's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from attndrift.analysis.common import SUBSET_MEAN, converged, final, mean_sd, num, zs
from attndrift.analysis.runs import Run, dataset_of, lr_of, model_of, short_model
from attndrift.analysis.settings import Setting, group_families
from attndrift.analysis.stats import welch
from attndrift.analysis.table import (
    Column,
    Table,
    format_value,
    make_table,
    register_summary,
    register_table,
)

ALPHA = 0.05
ACC_SLACK = 1.0  # test-accuracy points below the most accurate family worth a caveat


@dataclass(frozen=True)
class Pick:
    """One family at its best learning rate."""

    label: str
    setting: Setting
    retention: list[float]  # per completed seed: mean over transfer tasks
    test_acc: list[float]  # per completed seed, %

    @property
    def ret(self) -> tuple[float, float]:
        return mean_sd(self.retention)

    @property
    def acc(self) -> tuple[float, float]:
        return mean_sd(self.test_acc)

    @property
    def name(self) -> str:
        lr = lr_of(self.setting.config)  # a measured checkpoint records none
        return f"{self.label} · lr {format_value(lr, 'lr')}" if math.isfinite(lr) else self.label


def retention(run: Run) -> float:
    """A run's zero-shot retention %, the mean over its transfer tasks."""
    vals = [zs(run, t, "retention_pct") for t in (run.record or {}).get("zeroshot") or {}]
    vals = [v for v in vals if math.isfinite(v)]
    return math.fsum(vals) / len(vals) if vals else math.nan


def _best(settings: Sequence[Setting]) -> Setting | None:
    scored = []
    for s in settings:
        if s.completed:
            v = mean_sd(num(final(r).get("best_val_acc")) for r in s.completed)[0]
            scored.append((v if math.isfinite(v) else -math.inf, lr_of(s.config), s))
    return max(scored, key=lambda t: t[:2])[2] if scored else None


def _panels(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    out: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        if r.record is not None:
            out.setdefault((model_of(r.config), dataset_of(r.config)), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0].casefold(), kv[0][1].casefold())))


def _caveats(win: Pick, other: Pick | None, top: Pick, p: float) -> list[str]:
    out = []
    done = win.setting.completed
    late = sum(converged(r) is False for r in done)
    if late:
        out.append(f"{late} of {len(done)} seeds not converged (late val acc sd ≥ 0.005)")
    lost = len(win.setting.runs) - len(done)
    if lost:
        out.append(f"{lost} run{'s' if lost > 1 else ''} of this setting did not complete")
    if other is not None:
        if min(len(win.retention), len(other.retention)) < 2:
            out.append("fewer than 2 seeds: no test")
        elif not p < ALPHA:
            out.append(f"the gap to the next best is within seed noise (p ≥ {ALPHA:g})")
        late_o = sum(converged(r) is False for r in other.setting.completed)
        if late_o:
            out.append(f"next best: {late_o} of {len(other.setting.completed)} seeds not "
                       "converged")
    gap = top.acc[0] - win.acc[0]
    if top is not win and gap > ACC_SLACK:
        out.append(f"test accuracy {gap:.1f} points below {top.name}")
    return out


def _reference(picks: list[Pick]) -> Pick | None:
    """Plain full fine-tuning (no regularizer; the fewest distinguishing options), the study's
    reference method, when the store has it."""
    plain = [k for k in picks if k.setting.config.get("method") == "full_ft"
             and ((k.setting.config.get("regularizer") or {}).get("name") or "none") == "none"]
    return min(plain, key=lambda k: len(k.label)) if plain else None


def _row(panel: tuple[str, str], picks: list[Pick], several: bool) -> dict[str, Any]:
    win, *rest = sorted(picks, key=lambda k: -k.ret[0])
    other = rest[0] if rest else None
    top = max(picks, key=lambda k: (k.acc[0] if math.isfinite(k.acc[0]) else -math.inf,
                                    k is win))  # a tie in accuracy goes to the verdict's pick
    p = gap = p_ref = gap_ref = math.nan
    seeds = f"{len(win.retention)}"
    if other is not None:
        res = welch(win.retention, other.retention)
        p, gap = res.pvalue, win.ret[0] - other.ret[0]
        seeds += f" vs {len(other.retention)}"
    ref = _reference(picks)
    if ref is not None and ref is not win and ref is not other:
        p_ref, gap_ref = welch(win.retention, ref.retention).pvalue, win.ret[0] - ref.ret[0]
    return {
        "panel": f"{short_model(panel[0])} · {panel[1]}" if several else panel[1],
        "keeps": win.label, "lr": lr_of(win.setting.config),
        "retained": win.ret[0], "retained_sd": win.ret[1],
        "test_acc": win.acc[0] / 100, "test_acc_sd": win.acc[1] / 100,
        "vs": other.name if other else "— (one family)", "gap": gap, "p": p, "seeds": seeds,
        "ref": ref.name if ref is not None and ref is not win and ref is not other else "—",
        "gap_ref": gap_ref, "p_ref": p_ref,
        "most_accurate": top.name if top is not win else "the same",
        "caveats": "; ".join(_caveats(win, other, top, p)) or "none",
        "members": tuple(str(r.path) for r in win.setting.completed),
    }


COLUMNS = (
    Column("panel", "backbone · dataset"), Column("keeps", "keeps most transfer"),
    Column("lr", "at lr", "lr"), Column("retained", "retained %", "pct0", "retained_sd"),
    Column("test_acc", "test acc %", "acc", "test_acc_sd"), Column("vs", "next best"),
    Column("gap", "gap (points)", "pct"), Column("p", "Welch p", "p"),
    Column("seeds", "seeds"), Column("ref", "full FT at its best lr"),
    Column("gap_ref", "gap to full FT (points)", "pct"), Column("p_ref", "Welch p vs full FT", "p"),
    Column("most_accurate", "most accurate"),
    Column("caveats", "caveats"),
)


@register_table("verdict", "summary", order=10)
def verdict(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    panels = _panels(runs)
    several = len({m for m, _ in panels}) > 1
    rows = []
    for panel, members in panels.items():
        picks = []
        for fam in group_families(members):
            best = _best(fam.settings)
            if best is None:
                continue
            ret = [retention(r) for r in best.completed]
            acc = [100 * num(final(r).get("test_acc")) for r in best.completed]
            if any(math.isfinite(v) for v in ret):
                picks.append(Pick(fam.label, best, [v for v in ret if math.isfinite(v)], acc))
        if picks:
            rows.append(_row(panel, picks, several))
    return make_table(
        "verdict", "Verdict: which method keeps the most transfer",
        "Per backbone and dataset: each family of settings at its best learning rate by mean "
        "best validation accuracy (never the test split); the one keeping the most zero-shot "
        "accuracy (retained % of the pretrained model's, mean over transfer tasks; mean ± sd "
        "over seeds) against the next best and against plain full fine-tuning at its best lr, by "
        "Welch's t test over seeds (two-sided, not corrected for the two comparisons). "
        "Caveats: seeds not converged (003 §4.5) or not completed, too few seeds, a gap "
        "within seed noise, lower accuracy than the most accurate family.",
        COLUMNS, rows, "no completed run evaluated zero-shot transfer")


def _p(p: float) -> str:
    text = format_value(p, "p")
    return f"p < {text[1:]}" if text.startswith("<") else f"p = {text}"


@register_summary("verdict", order=10)
def verdict_lines(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> list[str]:
    """The verdict table as one sentence per backbone × dataset (ties in validation accuracy
    go to the higher lr, as the dashboard picks)."""
    table = verdict(runs, drift)
    if table.empty:
        return [f"No verdict: {table.skipped}."]
    out = []
    for r in table.rows:
        ret = f"{r['retained']:.1f}%" + (f" ± {r['retained_sd']:.1f}"
                                         if math.isfinite(r["retained_sd"]) else "")
        at = f" at lr {format_value(r['lr'], 'lr')}" if math.isfinite(r["lr"]) else ""
        line = (f"{r['panel']}: {r['keeps']}{at} keeps the most zero-shot transfer, {ret} "
                f"retained at {100 * r['test_acc']:.1f}% test accuracy")
        if math.isfinite(r["gap"]):
            line += (f"; {r['gap']:+.1f} points over {r['vs']} (Welch {_p(r['p'])}, "
                     f"{r['seeds']} seeds)")
        if math.isfinite(r["gap_ref"]):
            line += f"; {r['gap_ref']:+.1f} points over {r['ref']} ({_p(r['p_ref'])})"
        line += "." if r["caveats"] == "none" else f". Caveat: {r['caveats']}."
        out.append(line)
    return out
