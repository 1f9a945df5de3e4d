"""Attention probes: capture a CLIP vision encoder's CLS attention and score it.

``capture`` hooks the model and recomputes the CLS attention row (or the full maps);
``metrics`` holds the pure tensor metrics (entropy, ERF, Gini, head diversity) and the
per-layer summary; ``rollout`` (attention rollout, patch-to-patch entropy), ``cka`` (layerwise
linear CKA) and ``drift`` (weight and embedding drift) are the study's auxiliary analyses.
"""

from attndrift.probes.capture import (
    AttentionProbe,
    cls_patch_attention,
    find_encoder_layers,
    find_vision_tower,
    full_attention,
)
from attndrift.probes.cka import layer_representations, layerwise_cka, linear_cka
from attndrift.probes.drift import embedding_drift, vision_weight_snapshot, weight_drift
from attndrift.probes.metrics import (
    METRICS,
    MetricInfo,
    delta_pct,
    entropy,
    erf,
    gini,
    head_diversity,
    renormalize_patches,
    summarize,
)
from attndrift.probes.rollout import (
    attention_rollout,
    patch_to_patch_entropy,
    rollout_cls_patch,
    rollout_summary,
)

__all__ = [
    "METRICS",
    "AttentionProbe",
    "MetricInfo",
    "attention_rollout",
    "cls_patch_attention",
    "delta_pct",
    "embedding_drift",
    "entropy",
    "erf",
    "find_encoder_layers",
    "find_vision_tower",
    "full_attention",
    "gini",
    "head_diversity",
    "layer_representations",
    "layerwise_cka",
    "linear_cka",
    "patch_to_patch_entropy",
    "renormalize_patches",
    "rollout_cls_patch",
    "rollout_summary",
    "summarize",
    "vision_weight_snapshot",
    "weight_drift",
]
