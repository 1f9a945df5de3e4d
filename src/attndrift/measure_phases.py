"""The phases of one measurement (`attndrift.measure`): models, probe set, the final
evaluation of the reference and of the fine-tuned model, record.

Both models go through the final-evaluation phase a training run uses
(`attndrift.phases.evaluate_final`: attention on every probe subset, zero-shot, auxiliary
metrics, test accuracy) on the same probe subsets, and the record is written through the
run's typed record (`attndrift.measure_record`), so a run measured by ``measure`` reproduces
its own record.
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


def _evaluate(s: _State, model, preprocess, clip, tokenizer, aux, test_acc):
    """One model's final evaluation through the phase a training run uses
    (`attndrift.phases.evaluate_final`): attention on every probe subset, zero-shot scores
    through its own image encoder and text tower, auxiliary metrics (``aux``), test accuracy
    (``test_acc``)."""
    from attndrift.evaluate import probe_attention, zeroshot_all
    from attndrift.phases import evaluate_final
    from attndrift.zeroshot import text_classifier

    probe, data = s.plan.probe, s.plan.data

    def probe_of(images):
        return probe_attention(model, images, preprocess, s.dev, probe.batch_size,
                               probe.precision, on_device=True)

    def zeroshot():
        texts = {n: text_classifier(clip, tokenizer, k.class_names, k.templates, s.dev)
                 for n, k in s.zs_tasks.items()}
        return zeroshot_all(model, texts, s.zs_tasks, preprocess, s.dev, data.eval_batch_size,
                            s.plan.precision, detail=True)

    ev = evaluate_final(probe_of, s.split.probe_set.images, s.split.subsets, zeroshot, aux,
                        test_acc)
    for key in ("probe_s", "zeroshot_s", "aux_s"):
        s.timing[key] = s.timing.get(key, 0.0) + getattr(ev, key)
    return ev


def _aux_of(s: _State, model, preprocess, reference=None, weights=None):
    from attndrift.evaluate import auxiliary_metrics

    probe = s.plan.probe
    return auxiliary_metrics(model, s.probe_images, preprocess, s.dev, probe.batch_size,
                             list(probe.aux), reference, weights, probe.precision)


def _evaluate_both(s: _State, scored: bool):
    """The reference's evaluation (the record's baseline) and the fine-tuned model's
    against it (auxiliary metrics relative to the reference's representations and weights)."""
    from attndrift.probes.drift import vision_weight_snapshot

    held: dict[str, Any] = {}

    def ref_aux():
        values, held["aux_ref"] = _aux_of(s, s.ref_model, s.pre_ref)
        return values

    base = _evaluate(s, s.ref_model, s.pre_ref, s.ref.model, s.ref.tokenizer, ref_aux,
                     lambda: None)
    weights = vision_weight_snapshot(s.ref_model) if "drift" in s.plan.probe.aux else None
    final = _evaluate(s, s.ft.classifier, s.pre_ft, s.ft.clip, s.ft.tokenizer,
                      lambda: _aux_of(s, s.ft.classifier, s.pre_ft, held["aux_ref"],
                                      weights)[0],
                      lambda: _test_accuracy(s) if scored else None)
    return base, final


def _own_task_zeroshot(s: _State) -> float:
    """The reference's zero-shot accuracy on DATASET's validation split (a sanity check)."""
    from attndrift.evaluate import zeroshot_all
    from attndrift.zeroshot import text_classifier

    val_set = s.split.val_set
    own = {"task": text_classifier(s.ref.model, s.ref.tokenizer, val_set.class_names,
                                   val_set.templates, s.dev)}
    return zeroshot_all(s.ref_model, own, {"task": val_set}, s.pre_ref, s.dev,
                        s.plan.data.eval_batch_size, s.plan.precision)["task"]


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


def _test_accuracy(s: _State) -> float:
    """The fine-tuned head's accuracy on DATASET's test split (read here, once)."""
    from attndrift.phases import score_test_split

    return score_test_split(s.ft.classifier, s.plan.data.dataset, s.ref.image_size, s.pre_ft,
                            s.dev, s.plan.data.eval_batch_size, s.plan.precision)


def _val_accuracy(s: _State) -> float:
    from attndrift.evaluate import accuracy

    return accuracy(s.ft.classifier, s.split.val_set, s.pre_ft, s.dev,
                    s.plan.data.eval_batch_size, s.plan.precision)


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
    scored, results["head"] = _head_note(s)
    base, final = _evaluate_both(s, scored)
    results["base_attn"], results["final_attn"] = base.attn, final.attn
    results["baseline"] = {**base.metrics, "subsets": base.subsets, "aux": base.aux}
    results["final"] = {**final.metrics, "subsets": final.subsets}
    results["final_aux"] = final.aux
    own_acc = timed("zeroshot_s", _own_task_zeroshot, s)
    results["zeroshot"] = (base.zeroshot, final.zeroshot, own_acc)
    val_acc = timed("task_s", _val_accuracy, s) if scored else None
    results["task"] = (val_acc, final.test_acc)
    record = assemble(s, results)
    record["timing"] = {**s.timing, "total_s": time.perf_counter() - t_start}
    write_outputs(Path(plan.out_dir), record, s, results)
    return record
