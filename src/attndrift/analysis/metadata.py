"""Display metadata of the metrics, for tables and the report, without importing torch.

The metrics' metadata is declared once, in `attndrift.probes.metrics.METRICS`; but that module
imports torch, and the report must run from records alone on a laptop. So the report keeps a
copy here, and tests/test_tables.py fails if the copy and ``METRICS`` ever disagree. When torch
is already loaded (e.g. the report is made inside a training process), the original is read.
"""

from __future__ import annotations

import sys
from typing import NamedTuple


class MetricLabel(NamedTuple):
    name: str
    label: str
    unit: str
    meaning: str


# Mirror of attndrift.probes.metrics.METRICS (checked by a test).
_METRICS: dict[str, MetricLabel] = {m.name: m for m in (
    MetricLabel("entropy", "Attention entropy", "nats",
                "higher = broader, more diffuse attention"),
    MetricLabel("erf", "Effective receptive field", "fraction",
                "higher = 95% of the attention is spread over more of the patches"),
    MetricLabel("gini", "Gini coefficient", "", "higher = attention concentrated on fewer patches"),
    MetricLabel("head_diversity", "Head diversity", "",
                "higher = heads attend to more different patches"),
)}

# Short column labels for tables (the report's own choice, not metric metadata).
SHORT = {"entropy": "entropy", "erf": "ERF@0.95", "gini": "Gini",
         "head_diversity": "head div."}

# Auxiliary metrics a record may carry under final["aux"] (metric issue): label, how to read.
AUX = {
    "rollout_entropy": ("rollout entropy", "higher = broader attention flow across depth"),
    "rollout_erf": ("rollout ERF@0.95", "higher = broader"),
    "rollout_gini": ("rollout Gini", "higher = more concentrated"),
    "p2p_entropy": ("patch-to-patch entropy", "higher = broader patch-to-patch attention"),
    "p2p_entropy_layers": ("patch-to-patch entropy, layer mean", "per-layer values averaged"),
    "cka_cls": ("mean CKA (CLS)", "layer-mean CKA to the pretrained model; 1 = unchanged"),
    "cka_patch": ("mean CKA (patches)", "layer-mean CKA to the pretrained model; 1 = unchanged"),
    "weight_drift": ("weight drift", "relative distance of the weights from the pretrained"),
    "weight_drift_layers": ("weight drift, layer mean", "per-layer values averaged"),
    "embedding_drift": ("embedding drift", "change of the image embeddings on the probe set"),
}


def metric_info() -> dict[str, MetricLabel]:
    """name -> (name, label, unit, meaning) for the core metrics, in display order."""
    if "torch" in sys.modules:
        from attndrift.probes.metrics import METRICS

        return {k: MetricLabel(m.name, m.label, m.unit, m.meaning) for k, m in METRICS.items()}
    return dict(_METRICS)


def core_metrics() -> tuple[str, ...]:
    return tuple(metric_info())
