"""Public home of the core attention metrics: ``from attndrift.metrics import entropy, ...``."""

from attndrift.probes.metrics import (
                                      METRICS,
                                      delta_pct,
                                      entropy,
                                      erf,
                                      gini,
                                      head_diversity,
                                      summarize,
)

__all__ = ["METRICS", "delta_pct", "entropy", "erf", "gini", "head_diversity", "summarize"]
