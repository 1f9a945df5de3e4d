"""The phases of one measurement (`attndrift.measure`), in the order a run evaluates:
models, probe set, attention probe and auxiliary metrics, zero-shot, task accuracy, record.

Each phase uses the functions a training run uses (`attndrift.evaluate`), on the same probe
subsets, so a run measured by ``measure`` reproduces its own record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attndrift.models.classifier import CLIPClassifier


@dataclass
class Split:
    """The run's splits of DATASET: indices into its training split (``pool_idx``: where the
    probe images come from, the validation indices without a budget), the validation and
    probe sets, and the probe subsets (indices into ``probe_set``)."""

    train_idx: torch.Tensor
    val_idx: torch.Tensor
    pool_idx: torch.Tensor
    val_set: Any
    probe_set: Any
    subsets: list[torch.Tensor]


@dataclass
class _State:
    """What the phases fill in, in order."""

    plan: Any  # attndrift.measure.Plan
    dev: torch.device
    timing: dict[str, float] = field(default_factory=dict)
    ref: Any = None
    ft: Any = None
    ref_model: Any = None
    pre_ref: Any = None
    pre_ft: Any = None
    source: Any = None
    split: Any = None  # Split
    probe_images: Any = None
    zs_tasks: dict[str, Any] = field(default_factory=dict)
    zs_prompts: dict[str, Any] = field(default_factory=dict)


def _models(s: _State) -> None:
    from attndrift.models.clip import load_clip
    from attndrift.models.external import load_finetuned

    s.ref = load_clip(s.plan.reference)
    s.ft = load_finetuned(s.plan.finetuned, s.ref, s.plan.fmt, s.plan.open_clip_model)
    s.ref_model = CLIPClassifier(s.ref.model.vision_model, s.ref.model.visual_projection, 1)
    for module in (s.ref_model, s.ft.classifier, s.ft.clip, s.ref.model):
        module.to(s.dev)
    s.pre_ref = s.ref.preprocessor()
    s.pre_ft = type(s.pre_ref)(s.ref.image_size, s.ft.mean, s.ft.std)


def _probe_set(s: _State) -> None:
    """The validation split, probe subsets (from a probe split under ``data.budget``) and
    zero-shot task views exactly as a run builds them."""
    from attndrift.data.prompts import zeroshot_tasks
    from attndrift.data.registry import load_task
    from attndrift.data.splits import balanced_subset
    from attndrift.evaluate import run_probe_sets

    data, probe, size = s.plan.data, s.plan.probe, s.ref.image_size
    s.source = load_task(data.dataset, "train", image_size=size, progress=s.plan.progress)
    budget = data.budget
    split = Split(*run_probe_sets(
        s.source, data.val_frac, data.split_seed, probe.images, probe.subsets, probe.seed,
        (budget.train, budget.val, budget.probe) if budget else None))
    if data.train_limit is not None:
        split.train_idx = split.train_idx[
            balanced_subset(s.source.labels[split.train_idx], data.train_limit, data.split_seed)
        ]
    s.split = split
    s.probe_images = split.probe_set.images[split.subsets[0]]
    s.zs_tasks, s.zs_prompts = zeroshot_tasks(data.zeroshot, data.zeroshot_eval,
                                              image_size=size, progress=s.plan.progress)


def _attention(s: _State, model, preprocess) -> tuple[torch.Tensor, dict[str, Any]]:
    """The probe of subset 0 (maps and ``summarize``) plus every subset's layer means."""
    from attndrift.evaluate import probe_attention
    from attndrift.probes.metrics import summarize

    probe, split = s.plan.probe, s.split

    def probe_of(images):
        return probe_attention(model, images, preprocess, s.dev, probe.batch_size,
                               probe.precision, on_device=True)

    attn = probe_of(s.probe_images)
    metrics = summarize(attn)
    metrics["subsets"] = [metrics["mean"]] + [
        summarize(probe_of(split.probe_set.images[sub]))["mean"] for sub in split.subsets[1:]
    ]
    return attn, metrics


def _auxiliary(s: _State) -> tuple[dict[str, Any], dict[str, Any]]:
    """Auxiliary metrics of the reference and of the fine-tuned model against it."""
    from attndrift.evaluate import auxiliary_metrics
    from attndrift.probes.drift import vision_weight_snapshot

    probe, which = s.plan.probe, list(s.plan.probe.aux)
    base, aux_ref = auxiliary_metrics(s.ref_model, s.probe_images, s.pre_ref, s.dev,
                                      probe.batch_size, which, None, None, probe.precision)
    weights = vision_weight_snapshot(s.ref_model) if "drift" in which else None
    final = auxiliary_metrics(s.ft.classifier, s.probe_images, s.pre_ft, s.dev,
                              probe.batch_size, which, aux_ref, weights, probe.precision)[0]
    return base, final


def _zeroshot(s: _State) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Zero-shot scores (top-1, top-5, mean recall) of each model through its own image
    encoder and text tower, and the reference's zero-shot accuracy on the task itself (the
    sanity check's input)."""
    from attndrift.evaluate import zeroshot_all
    from attndrift.zeroshot import text_classifier

    bs, precision, val_set = s.plan.data.eval_batch_size, s.plan.precision, s.split.val_set

    def texts(clip, tokenizer, tasks):
        return {n: text_classifier(clip, tokenizer, k.class_names, k.templates, s.dev)
                for n, k in tasks.items()}

    ref_text = texts(s.ref.model, s.ref.tokenizer, s.zs_tasks)
    ft_text = texts(s.ft.clip, s.ft.tokenizer, s.zs_tasks)
    before = zeroshot_all(s.ref_model, ref_text, s.zs_tasks, s.pre_ref, s.dev, bs, precision,
                          detail=True)
    after = zeroshot_all(s.ft.classifier, ft_text, s.zs_tasks, s.pre_ft, s.dev, bs, precision,
                         detail=True)
    own = texts(s.ref.model, s.ref.tokenizer, {"task": val_set})
    own_acc = zeroshot_all(s.ref_model, own, {"task": val_set}, s.pre_ref, s.dev, bs,
                           precision)["task"]
    return before, after, own_acc


def _head_note(s: _State) -> tuple[bool, str]:
    """Whether the checkpoint's head is scored on the dataset, and what the record says."""
    details, data = s.ft.details, s.plan.data
    if s.ft.has_head:
        same = (details.get("dataset") == data.dataset
                and details.get("classes") == s.source.num_classes)
        return same, "the run's head" if same else "head trained on another dataset: not scored"
    ignored = details.get("ignored") or {}
    if details.get("head_classes"):
        return False, (f"a {details['head_classes']}-class head in the checkpoint: not scored "
                       "(measure scores the heads of attndrift runs only)")
    if ignored.get("modules_to_save"):
        return False, (f"modules_to_save {ignored['modules_to_save']} in the adapter "
                       f"({ignored['tensors']} tensors): a head the reference has no place "
                       "for, not scored")
    return False, "no classification head"


def _task_accuracy(s: _State, scored: bool) -> tuple[float | None, float | None]:
    from attndrift.data.registry import load_task
    from attndrift.evaluate import accuracy

    if not scored:
        return None, None
    bs, precision = s.plan.data.eval_batch_size, s.plan.precision
    val_acc = accuracy(s.ft.classifier, s.split.val_set, s.pre_ft, s.dev, bs, precision)
    test_set = load_task(s.plan.data.dataset, "test", image_size=s.ref.image_size)  # once
    return val_acc, accuracy(s.ft.classifier, test_set, s.pre_ft, s.dev, bs, precision)


def measure_phases(plan: Any, device: str = "auto") -> dict[str, Any]:
    """Run every phase of ``plan`` and write its record and attention maps; the record."""
    from attndrift.measure_record import assemble, write_outputs
    from attndrift.runtime import select_device

    t_start = time.perf_counter()
    s = _State(plan, select_device(device))
    results: dict[str, Any] = {}

    def timed(key: str, phase, *args):
        t = time.perf_counter()
        value = phase(*args)
        s.timing[key] = s.timing.get(key, 0.0) + time.perf_counter() - t
        return value

    timed("setup_s", _models, s)
    timed("setup_s", _probe_set, s)
    results["base_attn"], results["baseline"] = timed("probe_s", _attention, s, s.ref_model,
                                                      s.pre_ref)
    results["final_attn"], results["final"] = timed("probe_s", _attention, s, s.ft.classifier,
                                                    s.pre_ft)
    results["baseline"]["aux"], results["final_aux"] = timed("aux_s", _auxiliary, s)
    results["zeroshot"] = timed("zeroshot_s", _zeroshot, s)
    scored, results["head"] = _head_note(s)
    results["task"] = timed("task_s", _task_accuracy, s, scored)
    record = assemble(s, results)
    record["timing"] = {**s.timing, "total_s": time.perf_counter() - t_start}
    write_outputs(Path(plan.out_dir), record, s, results)
    return record
