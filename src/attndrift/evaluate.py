"""Evaluation passes used by the training loop: attention probes, auxiliary metrics,
accuracy, zero-shot, and the APR reference cache."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from attndrift.data.base import ImageTask, Preprocessor
from attndrift.models.classifier import CLIPClassifier
from attndrift.probes.capture import cls_patch_attention, full_attention
from attndrift.probes.cka import layer_representations, layerwise_cka
from attndrift.probes.drift import embedding_drift, weight_drift
from attndrift.probes.rollout import rollout_summary
from attndrift.zeroshot import zeroshot_accuracy, zeroshot_scores


def autocast(device: torch.device, precision: str):
    """bf16 autocast when asked for, or on CUDA under ``auto``; fp16 autocast for ``fp16`` (the
    study's AMP; the training loop pairs it with a GradScaler); otherwise a no-op."""
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def probe_attention(model: CLIPClassifier, images: torch.Tensor, preprocess: Preprocessor,
                    device: torch.device, batch_size: int, precision: str = "fp32", *,
                    on_device: bool = False) -> torch.Tensor:
    """CLS->patch attention ``[n, L, H, N]`` (float32, on the CPU, or on ``device`` with
    ``on_device``) of uint8 ``images`` under ``model``, the forward under
    ``autocast(device, precision)``.

    The batches stay on the device until the end: at most one device-to-host copy (one wait
    for the GPU) per probe. ``summarize`` of an ``on_device`` result runs on the GPU and
    brings back only the table, where the CPU would spend ~5-8 ms on a 200-image probe."""
    parts = []
    with eval_mode(model), autocast(device, precision):
        for start in range(0, images.shape[0], batch_size):
            x = preprocess(images[start : start + batch_size].to(device, non_blocking=True))
            parts.append(cls_patch_attention(model.vision_model, x).float())
    attn = torch.cat(parts)
    return attn if on_device else attn.cpu()


@torch.no_grad()
def accuracy(model: CLIPClassifier, task: ImageTask, preprocess: Preprocessor,
             device: torch.device, batch_size: int, precision: str = "fp32") -> float:
    correct = torch.zeros((), dtype=torch.long, device=device)
    with eval_mode(model):
        for start in range(0, len(task), batch_size):
            x = preprocess(task.images[start : start + batch_size].to(device, non_blocking=True))
            with autocast(device, precision):
                pred = model(x).argmax(dim=-1)
            correct += (pred == task.labels[start : start + batch_size].to(device)).sum()
    return float(correct) / max(1, len(task))


def zeroshot_all(model: CLIPClassifier, weights: dict[str, torch.Tensor],
                 tasks: dict[str, ImageTask], preprocess: Preprocessor, device: torch.device,
                 batch_size: int, precision: str = "fp32", *, detail: bool = False) -> dict:
    """Zero-shot accuracy on every task through the classifier's (adapted) image encoder, run
    under ``autocast(device, precision)``; the embeddings are normalised and compared with the
    text weights in float32. With ``detail``, each task's `zeroshot_scores` (top-1, top-5,
    mean per-class recall) instead of its top-1 accuracy."""

    def encode(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return model.embed(x)

    score = zeroshot_scores if detail else zeroshot_accuracy
    with eval_mode(model):
        return {name: score(encode, weights[name], task, preprocess, device, batch_size)
                for name, task in tasks.items()}


@torch.no_grad()
def auxiliary_metrics(model: CLIPClassifier, images: torch.Tensor, preprocess: Preprocessor,
                      device: torch.device, batch_size: int, which: list[str],
                      reference: dict[str, Any] | None = None,
                      weights: dict[str, torch.Tensor] | None = None,
                      precision: str = "fp32") -> tuple[dict[str, Any], dict[str, Any]]:
    """The auxiliary metrics of ``model`` on the probe ``images``.

    ``which`` picks from rollout (rollout entropy/ERF/Gini, patch-to-patch entropy), cka
    (layerwise linear CKA of the CLS and mean patch tokens against ``reference``) and drift
    (relative weight distance to ``weights``, embedding drift against ``reference``). Returns
    ``(aux, features)``: the JSON-able values, and the features a later call compares with
    (pass the pretrained model's as ``reference``). Forwards run under
    ``autocast(device, precision)``.
    """
    aux: dict[str, Any] = {}
    rollout_parts: list[tuple[int, dict[str, Any]]] = []
    reps: list[dict[str, torch.Tensor]] = []
    embeds: list[torch.Tensor] = []
    with eval_mode(model), autocast(device, precision):
        for start in range(0, images.shape[0], batch_size):
            x = preprocess(images[start : start + batch_size].to(device, non_blocking=True))
            if "rollout" in which:
                rollout_parts.append(
                    (x.shape[0], rollout_summary(full_attention(model.vision_model, x))))
            if "cka" in which:
                reps.append(layer_representations(model.vision_model, x))
            if "drift" in which:
                embeds.append(model.embed(x).float().cpu())
    if rollout_parts:
        n = sum(k for k, _ in rollout_parts)  # every value is a mean over images
        for key in rollout_parts[0][1]:
            parts = [torch.as_tensor(v[key], dtype=torch.float64) * k for k, v in rollout_parts]
            total = torch.stack(parts).sum(0) / n
            aux[key] = total.tolist() if total.dim() else float(total)
    features: dict[str, Any] = {}
    if reps:
        features["reps"] = {k: torch.cat([r[k] for r in reps], dim=1) for k in reps[0]}
        if reference is not None:
            cka = layerwise_cka(reference["reps"], features["reps"])
            aux["cka_cls"], aux["cka_patch"] = cka["cls"], cka["patch_mean"]
    if embeds:
        features["embeddings"] = torch.cat(embeds)
        if reference is not None:
            aux["embedding_drift"] = embedding_drift(reference["embeddings"],
                                                     features["embeddings"])
        if weights is not None:
            drift = weight_drift(model, weights)
            aux["weight_drift"], aux["weight_drift_layers"] = drift["total"], drift["per_layer"]
    return aux, features


@torch.no_grad()
def attention_cache(model: CLIPClassifier, images: torch.Tensor, preprocess: Preprocessor,
                    device: torch.device, batch_size: int,
                    layers: list[int] | None, precision: str = "fp32") -> torch.Tensor:
    """CLS->patch attention of every image unflipped and flipped, ``[n, 2, L, H, N]`` float16
    on the CPU: the pretrained reference APR compares with, computed once instead of running
    a frozen copy of the model on every training step. Forwards under
    ``autocast(device, precision)``."""
    out = []
    with eval_mode(model), autocast(device, precision):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device, non_blocking=True)
            both = [cls_patch_attention(model.vision_model,
                                        preprocess(batch, flip_mask=torch.full(
                                            (batch.shape[0],), flipped)), layers)
                    for flipped in (False, True)]
            out.append(torch.stack(both, dim=1).half().cpu())
    return torch.cat(out)


SANITY_FACTOR = 1.5  # zero-shot within this factor of chance: class names are probably wrong


def sanity_check(results: dict[str, tuple[float, int]]) -> tuple[dict, list[str]]:
    """Flag tasks whose pretrained zero-shot accuracy is within 1.5x of chance: the study's
    Flowers102 run scored 0.2% because its class names were numbers."""
    sanity, warnings = {}, []
    for name, (acc, classes) in results.items():
        chance = 1.0 / classes
        ok = acc > SANITY_FACTOR * chance
        sanity[name] = {"zeroshot": acc, "chance": chance, "ok": ok}
        if not ok:
            warnings.append(f"pretrained zero-shot accuracy on {name} is {100 * acc:.1f}%, within "
                            f"{SANITY_FACTOR}x of chance ({100 * chance:.1f}%): check its class "
                            "names and prompt templates")
    return sanity, warnings


def coefficient_of_variation(values: list[float]) -> float:
    """Sample standard deviation over the absolute mean (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(var) / abs(mean) if mean else math.inf


# --- pieces of a run record that `attndrift measure` builds too ---------------------------
# train.py builds the same values inline; after the phase restructuring it should call these,
# so a trained run and a measured checkpoint cannot drift apart in how they are computed.


def validation_probe_sets(source: ImageTask, val_frac: float, split_seed: int, images: int,
                          subsets: int, seed: int
                          ) -> tuple[torch.Tensor, torch.Tensor, ImageTask, list[torch.Tensor]]:
    """``(train_idx, val_idx, val_set, probe_subsets)`` of a training split, exactly as a run
    builds them: the stratified validation split (seeded), then ``subsets`` fixed
    class-balanced probe subsets of ``images`` validation images (seeds ``seed..``); indices
    of the subsets are into ``val_set``. The first subset is the one probed during training."""
    train_idx, val_idx, _, val_set, _, probe = run_probe_sets(
        source, val_frac, split_seed, images, subsets, seed)
    return train_idx, val_idx, val_set, probe


def run_probe_sets(source: ImageTask, val_frac: float, split_seed: int, images: int,
                   subsets: int, seed: int, budget: tuple[int, int, int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ImageTask, ImageTask,
                              list[torch.Tensor]]:
    """``(train_idx, val_idx, pool_idx, val_set, probe_set, probe_subsets)``: as
    `validation_probe_sets`, or, with a per-class ``budget`` ``(train, val, probe)``
    (`attndrift.data.splits.budget_split`, the later protocol), with the probe subsets drawn
    from a probe split disjoint from validation. ``pool_idx`` indexes ``source`` (the
    validation indices without a budget); the subsets index ``probe_set``."""
    from attndrift.data.splits import probe_subsets, run_split

    train_idx, val_idx, pool_idx = run_split(source.labels, val_frac, split_seed, budget)
    val_set = source.subset(val_idx, f"{source.name}/val")
    probe_set = source.subset(pool_idx, f"{source.name}/probe") if budget else val_set
    return (train_idx, val_idx, pool_idx, val_set, probe_set,
            probe_subsets(probe_set.labels, images, subsets, seed))


def drift_summary(final_metrics: dict[str, Any], baseline: dict[str, Any],
                  final_subsets: list[dict[str, float]]) -> dict[str, Any]:
    """The drift entries of a record's ``final``.

    ``delta_pct``: 002 §3.2 eq. 2, ``100 (m_adapted - m_pretrained) / m_pretrained`` of the
    layer means; ``delta_pct_layers``: the same per layer; ``subsets`` and
    ``delta_pct_subset_mean``: drift averaged over the fixed probe subsets (the study's
    reporting, 002 §4.3); ``subset_cv``: coefficient of variation over the subsets.
    ``baseline`` is ``summarize`` of the pretrained model plus its ``subsets``."""
    from attndrift.probes.metrics import METRICS, delta_pct

    return {
        "delta_pct": {m: delta_pct(final_metrics["mean"][m], baseline["mean"][m])
                      for m in METRICS},
        "delta_pct_layers": {
            m: [delta_pct(a, b) for a, b in zip(final_metrics[m]["layers"],
                                                 baseline[m]["layers"], strict=True)]
            for m in METRICS},
        "subsets": final_subsets,
        "delta_pct_subset_mean": {m: sum(delta_pct(f[m], b[m]) for f, b in zip(
            final_subsets, baseline["subsets"], strict=True)) / len(final_subsets)
            for m in METRICS},
        "subset_cv": {m: coefficient_of_variation([f[m] for f in final_subsets])
                      for m in METRICS},
    }


def zeroshot_summary(before: dict[str, Any], after: dict[str, Any],
                     tasks: dict[str, ImageTask],
                     prompts: dict[str, dict[str, Any]] | None = None
                     ) -> dict[str, dict[str, Any]]:
    """A record's ``zeroshot``: per task, accuracy before and after, retention % = after /
    before (002 §4.4: through the adapted image encoder), chance and class count. Given
    `zeroshot_scores` dicts instead of accuracies, also ``top5`` and ``mean_recall`` before
    and after; ``prompts`` adds each task's prompt entry (`attndrift.data.prompts`)."""
    out = {}
    for name, task in tasks.items():
        b, a = before[name], after[name]
        # each side a top-1 accuracy or a scores dict (a run resumed from an older checkpoint
        # holds a plain accuracy from before training)
        b1, a1 = (v["top1"] if isinstance(v, dict) else v for v in (b, a))
        entry = {"before": b1, "after": a1,
                 "retention_pct": 100.0 * a1 / b1 if b1 > 0 else None,
                 "chance": 1.0 / task.num_classes, "classes": task.num_classes}
        if isinstance(b, dict) and isinstance(a, dict):
            entry.update({k: {"before": b[k], "after": a[k]} for k in ("top5", "mean_recall")})
        if prompts and name in prompts:
            entry["prompt"] = prompts[name]
        out[name] = entry
    return out
