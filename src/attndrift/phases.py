"""The evaluation phases a training run and `attndrift measure` share, and what they record.

`data_provenance` records the probe sets a run (or measurement) used; `evaluate_final` is the
final evaluation of a model (attention on every probe subset, zero-shot, auxiliary metrics,
task accuracy on the test split); `final_record` turns its results into the record's typed
`Final`. A trained run and a measured checkpoint go through these same functions, so the two
cannot drift apart in how their numbers are computed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attndrift.data.base import ImageTask
from attndrift.data.splits import index_fingerprint
from attndrift.evaluate import accuracy, drift_summary
from attndrift.probes.metrics import summarize
from attndrift.records import Evaluated, Final


def data_provenance(dataset: str, source: ImageTask, train_idx: torch.Tensor,
                    val_idx: torch.Tensor, subsets: list[torch.Tensor],
                    pool_idx: torch.Tensor | None = None,
                    budget: dict[str, int] | None = None) -> dict[str, Any]:
    """``provenance.data``: the dataset's content fingerprint and those of the training,
    validation and probe index sets. ``subsets`` index ``pool_idx``, the probe pool (the
    validation split unless a per-class ``budget`` carved a probe split of its own)."""
    pool = val_idx if pool_idx is None else pool_idx
    return {"dataset": dataset, "content": source.fingerprint(),
            "train_ids": index_fingerprint(train_idx), "val_ids": index_fingerprint(val_idx),
            "probe_ids": [index_fingerprint(pool[s]) for s in subsets],
            "sizes": {"train": len(train_idx), "val": len(val_idx), "probe": len(subsets[0])},
            **({"probe_split_ids": index_fingerprint(pool), "budget": budget}
               if budget else {})}


@dataclass
class Evaluation:
    """What `evaluate_final` measured, with the seconds each pass took."""

    attn: torch.Tensor  # CLS->patch attention of probe subset 0, [n, L, H, N]
    metrics: dict[str, Any]  # summarize(attn)
    subsets: list[dict[str, float]]  # the layer-mean table of every probe subset
    zeroshot: dict[str, Any]  # per task: top-1 accuracy, or `zeroshot_scores`
    aux: dict[str, Any]
    test_acc: float | None
    probe_s: float
    zeroshot_s: float
    aux_s: float


def evaluate_final(
    probe_of: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    subsets: list[torch.Tensor],
    zeroshot: Callable[[], dict[str, float]],
    aux: Callable[[], dict[str, Any]],
    test_acc: Callable[[], float | None],
    attn: torch.Tensor | None = None,
) -> Evaluation:
    """The final evaluation of one model, in order: the attention probe of every probe subset
    (``subsets`` index ``images``, the probe pool; ``attn``, when given, is the first subset's
    already measured on these weights), zero-shot, auxiliary metrics, then test accuracy (the
    test split is read once, here). Each pass is a callable bound to the model evaluated."""
    t = time.perf_counter()
    if attn is None:
        attn = probe_of(images[subsets[0]])
    metrics = summarize(attn)
    means = [metrics["mean"]] + [summarize(probe_of(images[s]))["mean"]
                                 for s in subsets[1:]]
    probe_s = time.perf_counter() - t
    t = time.perf_counter()
    after = zeroshot()
    zeroshot_s = time.perf_counter() - t
    t = time.perf_counter()
    aux_values = aux()
    aux_s = time.perf_counter() - t
    return Evaluation(attn, metrics, means, after, aux_values, test_acc(), probe_s, zeroshot_s,
                      aux_s)


def score_test_split(model, dataset: str, image_size: int, preprocess, device: torch.device,
                  batch_size: int, precision: str) -> float:
    """Accuracy on ``dataset``'s test split (read here, once)."""
    from attndrift.data.registry import load_task

    test_set = load_task(dataset, "test", image_size=image_size)
    return accuracy(model, test_set, preprocess, device, batch_size, precision)


def final_record(metrics: dict[str, Any], subsets: list[dict[str, float]], aux: dict[str, Any],
                 baseline: dict[str, Any], *, test_acc: float | None,
                 val_acc: float | None = None, best_val_acc: float | None = None,
                 best_epoch: int | None = None, step: int | None = None,
                 epochs: float | None = None, train_loss: float | None = None,
                 evaluated: Evaluated | None = None) -> Final:
    """The record's ``final`` of a model whose attention table is ``metrics`` (and subset
    means ``subsets``) against ``baseline``: drift as `drift_summary` (002 §3.2 eq. 2 of the
    layer means), ``aux`` with the subsets' coefficient of variation added; the training
    facts are None for a model that was not trained here."""
    drift = drift_summary(metrics, baseline, subsets)
    subset_cv = drift.pop("subset_cv")
    return Final(step=step, epochs=epochs, val_acc=val_acc, best_val_acc=best_val_acc,
                 best_epoch=best_epoch, test_acc=test_acc, train_loss=train_loss,
                 metrics=metrics, **drift, aux={**aux, "subset_cv": subset_cv},
                 evaluated=evaluated)
