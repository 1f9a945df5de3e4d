"""Side-by-side comparison of finished runs, read from their records (no model code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attndrift.records import RecordError, read_record
from attndrift.signals import ATTENTION


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def load_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    return [read_record(Path(d)) for d in run_dirs]


def load_readable(run_dirs: list[Path]) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """``(directory, record)`` of every readable run and one line per unreadable one (corrupt,
    missing, wrong-typed: `read_record` names the file and the field)."""
    runs, problems = [], []
    for d in run_dirs:
        try:
            runs.append((Path(d), read_record(Path(d))))
        except RecordError as err:
            problems.append(str(err))
    return runs, problems


def run_labels(dirs: list[Path]) -> list[str]:
    """Column and row labels: the run directories' names, unique where config names
    (``tiny_lora`` twice) need not be; full paths when two names clash."""
    names = [d.name or str(d) for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def comparison_tables(records: list[dict[str, Any]],
                      labels: list[str] | None = None) -> list[Table]:
    labels = [escape(str(x)) for x in labels or [r["run_id"] for r in records]]  # not markup
    summary = Table(title="Runs: accuracy and layer-mean attention drift vs pretrained "
                          "(mean over the fixed probe subsets, 002; subset 0 where a record has "
                          "no subset means)")
    for col in ("run", "method", "lr", "status", "val acc", "test acc",
                *(f"Δ {s.short}" for s in ATTENTION.values())):
        summary.add_column(col, justify="left" if col in ("run", "method", "status") else "right")
    for label, r in zip(labels, records, strict=True):
        final = r.get("final") or {}
        # the study's drift (002): the mean over the fixed probe subsets, as the report reads it
        delta = final.get("delta_pct_subset_mean") or final.get("delta_pct", {})
        lr = (r["config"].get("train") or {}).get("lr")  # a measured checkpoint may have none
        summary.add_row(label, r["config"]["method"], "-" if lr is None else f"{lr:g}",
                        r["status"], _acc(final.get("best_val_acc")), _acc(final.get("test_acc")),
                        *(_pct(delta.get(m)) for m in ATTENTION))

    # a measured checkpoint may bring its own fine-tuned text tower (issue 22 item 6)
    towers = [((r.get("provenance") or {}).get("finetuned") or {}).get("text_tower") == "fine-tuned"
              for r in records]
    zeroshot = Table(title="Zero-shot transfer (adapted image encoder; text tower: "
                           + ("per run" if any(towers) else "pretrained, frozen") + ")")
    zeroshot.add_column("run")
    if any(towers):
        zeroshot.add_column("text tower")
    tasks = sorted({t for r in records for t in r.get("zeroshot", {})})
    for t in tasks:
        zeroshot.add_column(f"{t} before → after", justify="right")
        zeroshot.add_column("retained", justify="right")
    for label, r, own in zip(labels, records, towers, strict=True):
        cells = [("fine-tuned" if own else "pretrained")] if any(towers) else []
        for t in tasks:
            z = r.get("zeroshot", {}).get(t)
            cells += ["-", "-"] if z is None else [
                f"{_acc(z['before'])} → {_acc(z['after'])}",
                "-" if z["retention_pct"] is None else f"{z['retention_pct']:.0f}%"]
        zeroshot.add_row(label, *cells)

    layers = Table(title="Per-layer change of CLS→patch entropy (%, probe subset 0)")
    layers.add_column("layer", justify="right")
    per_layer = [(r.get("final") or {}).get("delta_pct_layers", {}).get("entropy", [])
                 for r in records]
    for label in labels:
        layers.add_column(label, justify="right")
    for i in range(max((len(p) for p in per_layer), default=0)):
        layers.add_row(str(i + 1), *(_pct(p[i]) if i < len(p) else "-" for p in per_layer))
    return [summary, zeroshot, layers]


def print_comparison(run_dirs: list[Path], console: Console | None = None) -> list[str]:
    """Print the tables of the readable runs; returns the lines on the unreadable ones. Raises
    `RecordError` when none is readable."""
    console = console or Console()
    runs, problems = load_readable(run_dirs)
    if not runs:
        raise RecordError("; ".join(problems) or "no run directories given")
    labels = run_labels([d for d, _ in runs])
    for table in comparison_tables([r for _, r in runs], labels):
        console.print(table)
    return problems
