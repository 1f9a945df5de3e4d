"""Display views of the signal spec for tables and the report (no torch).

Nothing is declared here: every label, unit and meaning comes from `attndrift.signals`, the one
place a metric or signal is declared. These helpers keep the shapes the table builders read.
"""

from __future__ import annotations

from attndrift.signals import ATTENTION, Signal, signals_of

# Short column labels of the attention metrics (e.g. "ERF@0.95").
SHORT: dict[str, str] = {m: s.short for m, s in ATTENTION.items()}

# Auxiliary metrics a record may carry under final["aux"]: label, how to read.
AUX: dict[str, tuple[str, str]] = {n: (s.label, s.meaning) for n, s in signals_of("aux").items()}


def metric_info() -> dict[str, Signal]:
    """name -> signal (``.label``, ``.unit``, ``.meaning``...) for the attention metrics, in
    display order."""
    return dict(ATTENTION)


def core_metrics() -> tuple[str, ...]:
    return tuple(ATTENTION)
