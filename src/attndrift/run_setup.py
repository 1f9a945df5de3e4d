"""A training run's set-up: what the phases before the loop build and the loop only reads.

`prepare` runs the set-up phases in order, each filling in its part of a `Setup`: the data
(model, training / validation / probe sets, zero-shot tasks and text classifiers, their
provenance), the adapted classifier, the optimisation (optimizer, schedule, step counts, probe
points) and the pretrained references the regularizers and drift metrics compare with.
`measure_baseline` measures the pretrained model and returns the loop's initial `LoopState`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attndrift.config import RunConfig
from attndrift.data.base import ImageTask, Preprocessor
from attndrift.data.prompts import zeroshot_tasks
from attndrift.data.registry import load_task
from attndrift.data.robustness import robustness_tasks
from attndrift.data.splits import balanced_subset
from attndrift.evaluate import (
    attention_cache,
    auxiliary_metrics,
    probe_attention,
    run_probe_sets,
    sanity_check,
    zeroshot_all,
)
from attndrift.models.adapt import adapt, method_kwargs
from attndrift.models.classifier import CLIPClassifier, count_parameters
from attndrift.models.clip import LoadedCLIP, load_clip
from attndrift.phases import data_provenance
from attndrift.probes.capture import AttentionProbe
from attndrift.probes.drift import vision_weight_snapshot
from attndrift.probes.metrics import summarize
from attndrift.records import RunRecord, file_sha256
from attndrift.regularizers import Pretrained, Regularizer, regularizer
from attndrift.runtime import LoopState, generators
from attndrift.signals import ATTENTION_SAMPLES
from attndrift.zeroshot import text_classifier


def warmup_cosine(total_steps: int, warmup_frac: float):
    """LR multiplier: linear warmup over ``warmup_frac`` of the steps, then cosine to zero."""
    warmup = max(1, round(warmup_frac * total_steps)) if warmup_frac > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def probe_steps(steps_per_epoch: int, total_steps: int, per_epoch: int) -> list[int]:
    """Steps (1-based, after the optimizer step) at which to probe: ``per_epoch`` evenly spaced
    points per epoch, and always the last step."""
    steps = {total_steps}
    if per_epoch > 0:
        epochs = math.ceil(total_steps / steps_per_epoch)
        for e in range(epochs):
            for k in range(1, per_epoch + 1):
                s = e * steps_per_epoch + round(k * steps_per_epoch / per_epoch)
                if 1 <= s <= total_steps:
                    steps.add(s)
    return sorted(steps)


@dataclass
class Setup:
    """What one run reads while it trains; each group is filled in by one phase."""

    cfg: RunConfig
    out_dir: Path
    record: RunRecord
    device: torch.device
    progress: bool
    # _data: the model as loaded, the fine-tuning task and its probe sets, zero-shot tasks
    loaded: LoadedCLIP = None
    preprocess: Preprocessor = None
    source: ImageTask = None  # the training split before validation was carved out
    train_set: ImageTask = None
    val_set: ImageTask = None
    probe_set: ImageTask = None  # the validation split, or the budget's probe split
    subsets: list[torch.Tensor] = None  # probe subsets, indices into probe_set
    probe_images: torch.Tensor = None  # subset 0: probed during training too
    zs_tasks: dict[str, ImageTask] = None
    zs_prompts: dict[str, dict[str, Any]] = None  # each task's prompt entry
    zs_weights: dict[str, torch.Tensor] = None  # text classifiers of the zero-shot tasks
    zs_subsets: dict[str, ImageTask] = None  # fixed subsets tracked during training
    robust: dict[str, ImageTask] = None  # corrupted test splits (data.robustness)
    # _model: the adapted classifier and what its checkpoints are labelled with
    model: CLIPClassifier = None
    meta: dict[str, str] = None
    # _optimisation
    params: list[torch.nn.Parameter] = None
    train_images: torch.Tensor = None  # on the device when small enough (data.resident_mb)
    train_labels: torch.Tensor = None
    forward: Any = None  # the training forward: the model, or its torch.compile
    optimizer: torch.optim.Optimizer = None
    scheduler: Any = None
    scaler: Any = None  # fp16 only
    bs: int = 0
    steps_per_epoch: int = 0
    epoch_images: int = 0
    total_steps: int = 0
    probe_at: frozenset[int] = frozenset()
    # _references: what the regularizers and drift metrics compare with
    pretrained_weights: dict[str, torch.Tensor] | None = None
    regularizer: Regularizer | None = None  # the registered regularizer, if any
    reg_state: dict[str, Any] = None  # its references (and, from the loop's start, targets)
    grab: AttentionProbe | None = None  # the gradient-carrying attention (apr, entropy_floor)

    @property
    def reg(self):
        return self.cfg.regularizer

    def probe_of(self, images: torch.Tensor) -> torch.Tensor:
        """The attention probe, as configured, summarized on the device."""
        return probe_attention(self.model, images, self.preprocess, self.device,
                               self.cfg.probe.batch_size, self.cfg.probe.precision,
                               on_device=True)

    def aux_of(self, reference=None, weights=None) -> tuple[dict[str, Any], dict[str, Any]]:
        return auxiliary_metrics(self.model, self.probe_images, self.preprocess, self.device,
                                 self.cfg.probe.batch_size, list(self.cfg.probe.aux), reference,
                                 weights, self.cfg.probe.precision)

    def zeroshot(self, weights: dict[str, torch.Tensor], tasks: dict,
                 detail: bool = False) -> dict:
        return zeroshot_all(self.model, weights, tasks, self.preprocess, self.device,
                            self.cfg.data.eval_batch_size, self.cfg.train.precision,
                            detail=detail)


def prepare(cfg: RunConfig, out_dir: Path, record: RunRecord, device: torch.device,
            progress: bool) -> Setup:
    """The set-up phases, in order; ``timing.setup_s`` covers data and model."""
    t0 = time.perf_counter()
    s = Setup(cfg, out_dir, record, device, progress)
    _data(s)
    _model(s)
    record.timing["setup_s"] = record.timing.get("setup_s", 0.0) + time.perf_counter() - t0
    _optimisation(s)
    _references(s)
    return s


def _data(s: Setup) -> None:
    """Load the CLIP model, the fine-tuning task (train / validation / probe subsets) and the
    zero-shot tasks with their text classifiers; record where each came from."""
    cfg, device, progress = s.cfg, s.device, s.progress
    s.loaded = loaded = load_clip(cfg.model)
    loaded.model.to(device).requires_grad_(False)  # text tower, logit scale: always frozen
    s.preprocess = loaded.preprocessor()
    size = loaded.image_size
    s.source = source = load_task(cfg.data.dataset, "train", image_size=size, progress=progress)
    # decoded (and cached) now, read at the end: a bad test image stops the run before training
    test = load_task(cfg.data.dataset, "test", image_size=size, progress=progress)
    budget = cfg.data.budget
    train_idx, val_idx, pool_idx, s.val_set, s.probe_set, s.subsets = run_probe_sets(
        source, cfg.data.val_frac, cfg.data.split_seed, cfg.probe.images, cfg.probe.subsets,
        cfg.probe.seed, (budget.train, budget.val, budget.probe) if budget else None)
    if cfg.data.train_limit is not None:
        train_idx = train_idx[balanced_subset(source.labels[train_idx], cfg.data.train_limit,
                                              cfg.data.split_seed)]
    s.train_set = source.subset(train_idx, f"{source.name}/train")
    s.probe_images = s.probe_set.images[s.subsets[0]]
    s.zs_tasks, s.zs_prompts = zeroshot_tasks(cfg.data.zeroshot, cfg.data.zeroshot_eval,
                                              image_size=size, progress=progress)
    rob = cfg.data.robustness
    s.robust = robustness_tasks(cfg.data.dataset, test, **rob.model_dump(), image_size=size,
                                progress=progress) if rob else {}
    s.zs_weights = {name: text_classifier(loaded.model, loaded.tokenizer, t.class_names,
                                          t.templates, device) for name, t in s.zs_tasks.items()}
    # forgetting during training: the same class-balanced images of each task at every point
    track = cfg.probe.period(cfg.probe.zeroshot_every)  # tracked at all (default: yes)
    s.zs_subsets = {name: t.subset(balanced_subset(t.labels, cfg.probe.zeroshot_images,
                                                   cfg.probe.seed), f"{name}/subset")
                    for name, t in s.zs_tasks.items()} if track else {}
    weights_file = Path(loaded.source) / "model.safetensors"
    s.record.provenance.update({
        "model_source": loaded.source,
        "model_sha256": file_sha256(weights_file, 16) if weights_file.is_file() else None,
        "data": data_provenance(cfg.data.dataset, source, train_idx, val_idx, s.subsets,
                                pool_idx, budget.model_dump() if budget else None),
        "zeroshot_data": {n: t.fingerprint() for n, t in s.zs_tasks.items()},
    })
    if s.zs_subsets:
        s.record.provenance["zeroshot_subsets"] = {
            n: {"images": len(t), "content": t.fingerprint()} for n, t in s.zs_subsets.items()}


def _model(s: Setup) -> None:
    """The classifier on the CLIP image tower, adapted as ``cfg.method`` says."""
    cfg = s.cfg
    torch.manual_seed(cfg.seed)  # head init and LoRA init depend only on the seed
    model = CLIPClassifier.from_clip(s.loaded.model, s.source.num_classes).to(s.device)
    adapted = adapt(model, cfg.method,
                    **method_kwargs(cfg.method, cfg.model_dump()))
    s.model = adapted.model.to(s.device)
    n_trainable, n_total = count_parameters(s.model)
    s.record.provenance["parameters"] = {"trainable": n_trainable, "total": n_total}
    s.meta = {"run_id": s.record.run_id, "method": cfg.method, "model": cfg.model}


def _optimisation(s: Setup) -> None:
    """Optimizer, schedule, step counts, probe points."""
    cfg, device, train_set = s.cfg, s.device, s.train_set
    s.params = [p for p in s.model.parameters() if p.requires_grad]
    # Training images small enough live on the device: a batch is then gathered there, with the
    # epoch's order copied over once, instead of on the host and copied from pageable memory on
    # every step (on the CPU, the same tensor).
    resident = (train_set.images.numel() * train_set.images.element_size()
                <= cfg.data.resident_mb * 2**20)
    s.train_images = train_set.images.to(device) if resident else train_set.images
    s.train_labels = train_set.labels.to(device) if resident else train_set.labels
    s.record.provenance["data"]["train_resident"] = resident
    # the training forward only: probes and evaluation hook into the plain module
    s.forward = (torch.compile(s.model, backend=cfg.train.compile) if cfg.train.compile
                 else s.model)
    s.optimizer = torch.optim.AdamW(s.params, lr=cfg.train.lr,
                                    weight_decay=cfg.train.weight_decay)
    s.bs = min(cfg.train.batch_size, len(train_set))
    # The study kept the ragged last batch (its loaders' drop_last=False): train.drop_last.
    s.steps_per_epoch = (len(train_set) // s.bs if cfg.train.drop_last
                         else math.ceil(len(train_set) / s.bs))
    s.epoch_images = s.steps_per_epoch * s.bs if cfg.train.drop_last else len(train_set)
    s.total_steps = s.steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        s.total_steps = min(s.total_steps, cfg.train.max_steps)
    s.scheduler = torch.optim.lr_scheduler.LambdaLR(
        s.optimizer, warmup_cosine(s.total_steps, cfg.train.warmup_frac))
    s.probe_at = frozenset(probe_steps(s.steps_per_epoch, s.total_steps, cfg.probe.per_epoch))
    # fp16 gradients underflow without loss scaling (the study's AMP: autocast + GradScaler)
    s.scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None


def _references(s: Setup) -> None:
    """What the regularizers and drift metrics compare with: taken from the pretrained model
    before any update, also on resume (the resumed weights are loaded after this)."""
    model, reg, cfg = s.model, s.reg, s.cfg
    s.pretrained_weights = vision_weight_snapshot(model) if "drift" in cfg.probe.aux else None

    def cache() -> torch.Tensor:
        t = time.perf_counter()
        ref = attention_cache(model, s.train_set.images, s.preprocess, s.device,
                              cfg.probe.batch_size, reg.layers, cfg.probe.precision)
        s.record.timing["apr_cache_s"] = time.perf_counter() - t
        s.record.timing["apr_cache_mb"] = ref.numel() * ref.element_size() / 2**20
        return ref

    s.regularizer = regularizer(reg.name)
    s.reg_state = (s.regularizer.prepare(Pretrained(model, reg.layers, reg.ratio, s.device,
                                                    cache)) if s.regularizer else {})
    s.grab = (AttentionProbe(model.vision_model, reg.layers, detach=False)
              if s.regularizer and s.regularizer.attention else None)


def measure_baseline(s: Setup) -> LoopState:
    """Measure the pretrained model (attention on every probe subset, zero-shot, sanity of the
    class names, auxiliary metrics) into the record; return the loop's initial state."""
    record, val_set = s.record, s.val_set
    t = time.perf_counter()
    base_attn = s.probe_of(s.probe_images)
    record.baseline = summarize(base_attn)
    record.baseline["subsets"] = [record.baseline["mean"]] + [
        summarize(s.probe_of(s.probe_set.images[i]))["mean"] for i in s.subsets[1:]]
    probe_s = time.perf_counter() - t
    t = time.perf_counter()
    zs_before = s.zeroshot(s.zs_weights, s.zs_tasks, detail=True)
    own = text_classifier(s.loaded.model, s.loaded.tokenizer, val_set.class_names,
                          val_set.templates, s.device)
    own_acc = s.zeroshot({"task": own}, {"task": val_set})["task"]
    record.sanity, record.warnings = sanity_check(
        {f"{s.cfg.data.dataset} (validation)": (own_acc, val_set.num_classes),
         **{n: (zs_before[n]["top1"], t.num_classes) for n, t in s.zs_tasks.items()}})
    if s.zs_subsets:  # the trajectory's starting point, on the same subsets as the probes
        record.baseline["zeroshot_subset"] = s.zeroshot(s.zs_weights, s.zs_subsets)
    zeroshot_s = time.perf_counter() - t
    t = time.perf_counter()
    record.baseline["aux"], aux_ref = s.aux_of()
    order_gen, flip_gen = generators(s.cfg.seed)
    return LoopState(
        step=0, epoch=0, batch=0, perm=torch.empty(0, dtype=torch.long),
        loss_sum=torch.zeros((), device=s.device), reg_sum=torch.zeros((), device=s.device),
        loss_count=0, best_val=-1.0, best_epoch=0, train_s=0.0, probe_s=probe_s,
        zeroshot_s=zeroshot_s, aux_s=time.perf_counter() - t, aux_ref=aux_ref,
        zs_before=zs_before, base_attn=base_attn[:ATTENTION_SAMPLES].cpu(),
        order_gen=order_gen, flip_gen=flip_gen, history=record.history)
