"""Results as data (issue 22 item 13): a run store's tables and run histories as pandas
DataFrames, for a notebook or a script.

    import attndrift
    res = attndrift.load_store("runs/demo")
    res.names                      # every table the report shows, in report order
    res["matched_lr"].to_pandas()  # one table: raw values (fractions, % points, p-values)
    res.history(res.runs[0])       # {"probes": ..., "layers": ..., "epochs": ..., "loss": ...}

The tables are exactly the report's (`attndrift.analysis.all_tables`), built on first use; their
CSV files under ``report/tables/`` hold the same values. Reads records only: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attndrift.analysis import SUBSET_MEAN, Run, Table, all_tables
from attndrift.analysis import load_store as load_runs

if TYPE_CHECKING:
    import pandas as pd


class Results:
    """The runs of one store and, built on first access, the report's tables by name."""

    def __init__(self, root: Path, runs: Sequence[Run], drift: str = SUBSET_MEAN) -> None:
        self.root = Path(root)
        self.runs = list(runs)
        self.drift = drift

    @cached_property
    def tables(self) -> dict[str, Table]:
        return {t.name: t for t in all_tables(self.runs, str(self.root), self.drift)}

    @property
    def names(self) -> list[str]:
        """Tables that have rows, in report order (an empty one says why in ``skipped``)."""
        return [n for n, t in self.tables.items() if not t.empty]

    def __getitem__(self, name: str) -> Table:
        try:
            return self.tables[name]
        except KeyError:
            raise KeyError(f"no table {name!r}; tables: {', '.join(self.tables)}") from None

    def __iter__(self) -> Iterator[Table]:
        return iter(self.tables.values())

    def run(self, name: str) -> Run:
        """A run by its directory name (or, when unique, its config name)."""
        hits = [r for r in self.runs if r.path.name == name] or [
            r for r in self.runs if r.name == name]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} runs named {name!r} in {self.root}")
        return hits[0]

    def history(self, run: Run | str) -> dict[str, pd.DataFrame]:
        """The run's history as DataFrames (see `history_frames`)."""
        return history_frames(self.run(run) if isinstance(run, str) else run)


def load_store(path: str | Path, drift: str = SUBSET_MEAN) -> Results:
    """Every run under ``path`` (any status) and the report's tables over them."""
    return Results(Path(path), load_runs(Path(path)), drift)


def _scalars(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to dotted keys; lists (per-layer, per-head) are left out."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(_scalars(v, f"{prefix}{k}."))
    elif isinstance(value, bool | int | float | str) or value is None:
        out[prefix[:-1]] = value
    return out


def history_frames(run: Run) -> dict[str, pd.DataFrame]:
    """A run's record history as DataFrames, one row per event:

    - ``probes``: step, epoch, fraction, the layer mean of every metric (one column each,
      ``entropy``, ``erf``, ...), zero-shot accuracy on tracked tasks (``zeroshot.TASK``) and any
      other scalar the probe recorded (dotted names);
    - ``layers``: long form of the per-layer values at each probe (step, metric, layer from 1,
      value);
    - ``epochs``: validation accuracy per epoch; ``loss``: the logged training loss and lr.
    """
    import pandas as pd

    hist = (run.record or {}).get("history") or {}
    probes, layers = [], []
    for p in hist.get("probes") or []:
        metrics = p.get("metrics") or {}
        row = {k: p.get(k) for k in ("step", "epoch", "fraction")}
        row.update(metrics.get("mean") or {})
        row.update(_scalars({k: v for k, v in p.items() if k not in (*row, "metrics")}))
        probes.append(row)
        for m, block in metrics.items():
            if m != "mean" and isinstance(block, dict):
                for i, v in enumerate(block.get("layers") or [], start=1):
                    layers.append({"step": p.get("step"), "metric": m, "layer": i,
                                   "value": math.nan if v is None else v})
    return {
        "probes": pd.DataFrame(probes),
        "layers": pd.DataFrame(layers, columns=["step", "metric", "layer", "value"]),
        "epochs": pd.DataFrame([_scalars(e) for e in hist.get("epochs") or []]),
        "loss": pd.DataFrame([_scalars(e) for e in hist.get("loss") or []]),
    }
