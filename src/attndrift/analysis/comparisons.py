"""Per-setting intervals and the backbone comparison.

- `bootstrap_cis`: 95% percentile bootstrap CI of Δ entropy per setting over its seeds (003
  §3.2.2 reports such intervals; here the resampling units are seeds, never layers).
- `backbone_comparison`: settings equal but for the backbone side by side, with the entropy
  gap (002 Table 4).
"""

from __future__ import annotations

from collections.abc import Sequence

from attndrift.analysis import stats
from attndrift.analysis.common import (
    DESCRIBE,
    SUBSET_MEAN,
    context,
    delta,
    describe,
    drift_note,
    final,
    mean_sd,
    num,
    order,
    settings,
)
from attndrift.analysis.inference import contrasts, level_label, where_label
from attndrift.analysis.runs import Run
from attndrift.analysis.settings import setting_order
from attndrift.analysis.table import Column, Table, make_table, register_table
from attndrift.signals import ATTENTION

CI_LEVEL, CI_RESAMPLES = 0.95, 10_000


@register_table("bootstrap_ci", "statistics", order=10)
def bootstrap_cis(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    ctx, rows = context(runs), []
    for s in settings(runs):
        values = [delta(r, "entropy", drift) for r in s.completed]
        if not s.completed:
            continue
        res = stats.bootstrap_ci(values, level=CI_LEVEL, n_resamples=CI_RESAMPLES)
        mean, sd = mean_sd(values)
        row = describe(s.runs[0], ctx)
        row.pop("run"), row.pop("seed")
        row.update({"n": res.n, "mean": mean, "sd": sd, "lo": res.ci[0], "hi": res.ci[1],
                    "excludes_zero": ("n/a" if not res.n or res.n < 2 or res.ci[0] != res.ci[0]
                                      else "yes" if res.ci[0] > 0 or res.ci[1] < 0 else "no"),
                    "members": tuple(str(r.path) for r in s.completed)})
        rows.append(row)
    cols = (*DESCRIBE, Column("n", "seeds", "int"),
            Column("mean", "Δ entropy % (mean ± sd)", "pct", "sd"),
            Column("lo", "95% CI low", "pct"), Column("hi", "95% CI high", "pct"),
            Column("excludes_zero", "CI excludes 0"))
    return make_table("bootstrap_ci", "Bootstrap confidence intervals of Δ entropy",
                      f"Per setting: {CI_LEVEL:.0%} percentile bootstrap interval of the mean Δ "
                      f"entropy over its completed seeds ({CI_RESAMPLES} resamples, seed 0; "
                      "003 §3.2.2 reports such intervals). With 3 seeds a resample takes at most "
                      "10 distinct means: read the interval as a rough spread, not a coverage "
                      f"guarantee. {drift_note(drift)}", cols, sorted(rows, key=order),
                      "no completed runs")


@register_table("backbone_comparison", "results", order=80)
def backbone_comparison(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    rows, ctx = [], context(runs)
    for factor, a, b in contrasts(runs, min_seeds=1):
        if factor != "model":
            continue
        row = {"where": where_label(a.config, "model", other=ctx.other[a.key]),
               "a": level_label(a.config, "model"),
               "b": level_label(b.config, "model"),
               "n": f"{len(a.completed)} vs {len(b.completed)}",
               "members": (tuple(str(r.path) for r in a.completed),
                           tuple(str(r.path) for r in b.completed)),
               "_order": setting_order(a.config)}
        for key, get in (*((f"d_{m}", lambda r, m=m: delta(r, m, drift)) for m in ATTENTION),
                         ("test_acc", lambda r: num(final(r).get("test_acc")))):
            row[f"{key}_a"] = mean_sd(get(r) for r in a.completed)[0]
            row[f"{key}_b"] = mean_sd(get(r) for r in b.completed)[0]
        row["gap"] = row["d_entropy_b"] - row["d_entropy_a"]
        rows.append(row)
    cols = (Column("where", "setting"), Column("a", "backbone A"), Column("b", "backbone B"),
            Column("n", "seeds A vs B"),
            *(Column(f"d_{m}_{ab}", f"Δ {s.short} % {ab.upper()}", "pct")
              for m, s in ATTENTION.items() for ab in ("a", "b")),
            Column("test_acc_a", "test acc % A", "acc"),
            Column("test_acc_b", "test acc % B", "acc"),
            Column("gap", "entropy gap (B − A)", "pct"))
    return make_table("backbone_comparison", "Backbone comparison",
                      "As the matched-LR preprint's Table 4: settings equal in everything but "
                      "the backbone, side by side (means over completed seeds; A is the coarser "
                      "patch size). Entropy gap = Δ entropy of B minus that of A, in "
                      "percentage points; each backbone's drift is relative to its own "
                      f"pretrained model. {drift_note(drift)}", cols,
                      sorted(rows, key=lambda r: (r["_order"], r["where"])),
                      "no two settings differ only in the backbone")
