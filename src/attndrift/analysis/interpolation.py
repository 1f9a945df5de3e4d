"""The pretrained -> fine-tuned walks of ``attndrift interpolate`` (issue 22 item 5): WiSE-FT
weight interpolation (Wortsman et al., 2022) for full FT and freezing, the scaled LoRA delta
for LoRA, read from each run directory's ``interpolation.json`` and averaged over the seeds of
a setting at each alpha (0 = pretrained encoder, 1 = the fine-tuned run).

Reads files only (no torch): `attndrift.interpolate` writes them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from attndrift.analysis.common import SUBSET_MEAN, completed, mean_sd, num
from attndrift.analysis.runs import Run, dataset_of, model_of, short_model
from attndrift.analysis.settings import Setting, group_settings
from attndrift.analysis.table import Column, Table, make_table, register_table

INTERPOLATION_FILE = "interpolation.json"  # as attndrift.interpolate writes it
MAX_BYTES = 16 << 20  # a walk of a few alphas is kilobytes; anything huge is not one


def read_walk(run: Run) -> dict[str, Any] | None:
    """The run's interpolation result, or None when it has none or it is unreadable (the
    table's notes count those)."""
    path = run.path / INTERPOLATION_FILE
    try:
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("rows"), list) and all(
        isinstance(r, dict) and isinstance(r.get("alpha"), int | float) for r in data["rows"])
    return data if ok else None


def _zs_mean(row: dict[str, Any]) -> float:
    vals = [num(v) for v in (row.get("zeroshot") or {}).values()]
    vals = [v for v in vals if math.isfinite(v)]
    return math.fsum(vals) / len(vals) if vals else math.nan


def walk_points(setting: Setting) -> list[dict[str, Any]]:
    """Per alpha that every walked seed of ``setting`` evaluated: the seed mean ± sd of test
    accuracy, zero-shot accuracy (mean over tasks, and per task) and Δ entropy."""
    walks = [w for w in (read_walk(r) for r in completed(setting.runs)) if w is not None]
    if not walks:
        return []
    by_alpha = [{float(r["alpha"]): r for r in w["rows"]} for w in walks]
    alphas = sorted(set.intersection(*(set(b) for b in by_alpha)))
    tasks = sorted({t for w in walks for r in w["rows"] for t in r.get("zeroshot") or {}})
    out = []
    for a in alphas:
        rows = [b[a] for b in by_alpha]
        point: dict[str, Any] = {"alpha": a, "n": len(rows),
                                 "scheme": ", ".join(sorted({str(w.get("scheme")) for w in walks}))}
        values = {"test_acc": [num(r.get("test_acc")) for r in rows],
                  "zs_mean": [_zs_mean(r) for r in rows],
                  "d_entropy": [num((r.get("delta_pct") or {}).get("entropy")) for r in rows]}
        values.update({f"zs_{t}": [num((r.get("zeroshot") or {}).get(t)) for r in rows]
                       for t in tasks})
        for key, vals in values.items():
            point[key], point[f"{key}_sd"] = mean_sd(vals)
        out.append(point)
    return out


def walked_settings(runs: Sequence[Run]) -> list[tuple[Setting, list[dict[str, Any]]]]:
    """Settings (in report order) with at least one walked seed, and their points."""
    out = []
    for s in group_settings(r for r in runs if r.record is not None):
        points = walk_points(s)
        if points:
            out.append((s, points))
    return out


@register_table("interpolation", "interpolation", order=10)
def interpolation(runs: Sequence[Run], drift: str = SUBSET_MEAN) -> Table:
    walked = walked_settings(runs)
    tasks = sorted({k[3:] for _, pts in walked for p in pts for k in p
                    if k.startswith("zs_") and k != "zs_mean" and not k.endswith("_sd")})
    rows = []
    for s, points in walked:
        for p in points:
            rows.append({"model": short_model(model_of(s.config)),
                         "dataset": dataset_of(s.config), "setting": s.label, **p,
                         "members": tuple(str(r.path) for r in completed(s.runs))})
    columns = [Column("model", "backbone"), Column("dataset", "dataset"),
               Column("setting", "setting"), Column("scheme", "scheme"),
               Column("alpha", "alpha", "f2"), Column("n", "seeds", "int"),
               Column("test_acc", "test acc %", "acc", "test_acc_sd"),
               Column("zs_mean", "zero-shot % (task mean)", "acc", "zs_mean_sd"),
               *(Column(f"zs_{t}", f"zero-shot {t} %", "acc", f"zs_{t}_sd") for t in tasks),
               Column("d_entropy", "Δ entropy %", "pct", "d_entropy_sd")]
    return make_table(
        "interpolation", "Interpolation: accuracy and zero-shot along pretrained → fine-tuned",
        "Runs walked back toward the pretrained model with `attndrift interpolate`: WiSE-FT "
        "weight interpolation (Wortsman et al., 2022) for full FT and freezing, the LoRA delta "
        "scaled by alpha for LoRA; alpha 0 = pretrained encoder, 1 = the fine-tuned run. The "
        "classification head is the fine-tuned one at every alpha. Mean ± sd over the seeds of "
        "each setting that were walked at the same alphas.",
        columns, rows, "no run has an interpolation.json (run `attndrift interpolate RUN_DIR`)")
