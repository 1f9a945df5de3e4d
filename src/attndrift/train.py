"""The one explicit training loop: config -> fine-tuned classifier -> run record.

`_run` is the sequence of phases, one function each, read top to bottom: prepare data and
model, prepare the optimisation, take the pretrained references, measure the baseline (or
restore a checkpoint), train with AdamW + warmup/cosine while probing attention on a fixed
validation subset, then the final evaluation, which writes the weights and fills in the record.
What the phases set up and the loop only reads lives on a `_Run`.

Everything the loop mutates lives in one dict, ``state``, which is saved atomically to
``resume.pt`` at the first epoch end ``train.checkpoint_minutes`` after the previous save (and
every ``train.checkpoint_every`` steps): a killed run called again with the same config
continues from there and ends with the same weights and record as an uninterrupted one (on CPU;
GPU kernels may differ in the last bits). The best epoch's weights are kept in host memory and
written to ``best.safetensors`` with each checkpoint and at the end.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attndrift.config import RunConfig, identity
from attndrift.data.prompts import zeroshot_tasks
from attndrift.data.registry import load_task
from attndrift.data.robustness import robustness_summary, robustness_tasks
from attndrift.data.splits import balanced_subset, index_fingerprint
from attndrift.evaluate import (
    accuracy,
    attention_cache,
    autocast,
    auxiliary_metrics,
    drift_summary,
    probe_attention,
    run_probe_sets,
    sanity_check,
    zeroshot_all,
    zeroshot_summary,
)
from attndrift.guard import at_probe, for_run
from attndrift.models.adapt import adapt, method_kwargs
from attndrift.models.classifier import CLIPClassifier, count_parameters, trainable_state
from attndrift.models.clip import load_clip
from attndrift.probes.capture import AttentionProbe
from attndrift.probes.drift import vision_weight_snapshot
from attndrift.probes.metrics import renormalize_patches, summarize
from attndrift.records import (
    RECORD_FILE,
    file_sha256,
    new_record,
    provenance,
    run_id_for,
    write_record,
)
from attndrift.regularizers import Batch, Pretrained, regularizer
from attndrift.runtime import (
    RESUME_FILE,
    board_metrics,
    load_resume,
    open_board,
    progress_bar,
    save_resume,
    save_weights,
    select_device,
)
from attndrift.zeroshot import text_classifier

ATTENTION_SAMPLES = 8  # probe images whose maps are saved for heatmap overlays


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


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


def run(cfg: RunConfig, out_dir: str | Path, *, progress: bool = True,
        resume: bool = True) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says and write ``out_dir/record.json`` (+ checkpoints).

    With ``resume`` (default) an interrupted run of the same config in ``out_dir`` continues
    from its last checkpoint. Returns the record. A diverged run (NaN/inf loss) returns with
    status ``diverged``; any other failure is recorded as ``failed`` and re-raised.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = cfg.model_dump(mode="json")
    run_id = run_id_for(identity(config))
    saved = load_resume(out_dir, run_id) if resume else None
    record = saved[1] if saved else new_record(run_id, config)
    t_start = time.perf_counter()
    timing = record["timing"]
    try:
        _run(cfg, out_dir, record, saved[0] if saved else None, progress=progress)
    except Diverged as err:
        record["status"] = "diverged"
        record["error"] = str(err)
    except BaseException as err:
        # Ctrl-C / SIGTERM (the CLI turns it into KeyboardInterrupt): resumable, not a failure
        stopped = isinstance(err, KeyboardInterrupt)
        record["status"] = "interrupted" if stopped else "failed"
        record["error"] = "interrupted" if stopped else f"{type(err).__name__}: {err}"
        record["traceback"] = "" if stopped else traceback.format_exc()
        timing["total_s"] = timing.get("total_s", 0.0) + time.perf_counter() - t_start
        with contextlib.suppress(OSError):  # a full disk: the original error is the one to see
            write_record(out_dir / RECORD_FILE, record)
        raise
    else:
        record["status"] = "completed"
    timing["total_s"] = timing.get("total_s", 0.0) + time.perf_counter() - t_start
    write_record(out_dir / RECORD_FILE, record)
    (out_dir / RESUME_FILE).unlink(missing_ok=True)  # a finished run needs no resume state
    return record


class _Run:
    """What one run reads while it trains, filled in by the set-up phases in order. The loop's
    mutable state is apart from it: ``state``, one dict, the thing ``resume.pt`` holds."""

    def __init__(self, cfg: RunConfig, out_dir: Path, record: dict[str, Any],
                 device: torch.device, progress: bool) -> None:
        self.cfg, self.out_dir, self.record = cfg, out_dir, record
        self.device, self.progress = device, progress
        self.timing: dict[str, Any] = record["timing"]
        self.history: dict[str, list] = record["history"]
        self.reg = cfg.regularizer
        self.aux_which = list(cfg.probe.aux)
        self.best: dict[str, Any] = {}  # improved trainable state not yet on disk + its epoch
        self.perm_at: torch.Tensor | None = None  # the epoch's order where the images are

    def probe_of(self, images: torch.Tensor) -> torch.Tensor:
        """The attention probe, as configured, summarized on the device."""
        return probe_attention(self.model, images, self.preprocess, self.device,
                               self.cfg.probe.batch_size, self.cfg.probe.precision,
                               on_device=True)

    def aux_of(self, reference=None, weights=None) -> tuple[dict[str, Any], dict[str, Any]]:
        return auxiliary_metrics(self.model, self.probe_images, self.preprocess, self.device,
                                 self.cfg.probe.batch_size, self.aux_which, reference, weights,
                                 self.cfg.probe.precision)

    def zeroshot(self, weights: dict[str, torch.Tensor], tasks: dict,
                 detail: bool = False) -> dict:
        return zeroshot_all(self.model, weights, tasks, self.preprocess, self.device,
                            self.cfg.data.eval_batch_size, self.cfg.train.precision,
                            detail=detail)


def _run(cfg: RunConfig, out_dir: Path, record: dict[str, Any], saved: dict[str, Any] | None,
         *, progress: bool) -> None:
    """The run's phases, in order."""
    timing = record["timing"]
    t0 = time.perf_counter()
    device = select_device(cfg.device)
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"train.precision=fp16 (autocast + GradScaler) needs a CUDA device, "
                         f"got {device}; use train.precision=bf16 or fp32")
    if saved is None:
        record["provenance"] = provenance(str(device))
        write_record(out_dir / RECORD_FILE, record)  # status "running": the run has started
    else:
        timing["resumed"] = timing.get("resumed", 0) + 1
    torch.manual_seed(cfg.seed)
    r = _Run(cfg, out_dir, record, device, progress)
    r.guard = for_run(cfg, record)  # early-warning guard (None without a guard section)
    _prepare_data(r)
    _prepare_model(r)
    timing["setup_s"] = timing.get("setup_s", 0.0) + time.perf_counter() - t0
    _prepare_optimisation(r)
    _pretrained_references(r)
    state = _baseline(r) if saved is None else _restore(r, saved)
    last_attn = _train(r, state)
    _final_evaluation(r, state, last_attn)


# --- set-up -------------------------------------------------------------------------------


def _prepare_data(r: _Run) -> None:
    """Load the CLIP model, the fine-tuning task (train / validation / probe subsets) and the
    zero-shot tasks with their text classifiers; record where each came from."""
    cfg, device, progress = r.cfg, r.device, r.progress
    r.loaded = loaded = load_clip(cfg.model)
    r.clip = loaded.model.to(device)
    r.clip.requires_grad_(False)  # text tower, logit scale: always frozen
    r.preprocess = loaded.preprocessor()
    r.image_size = size = loaded.image_size
    source = load_task(cfg.data.dataset, "train", image_size=size, progress=progress)
    # decoded (and cached) now, read at the end: a bad test image stops the run before training
    test = load_task(cfg.data.dataset, "test", image_size=size, progress=progress)
    budget = cfg.data.budget
    train_idx, val_idx, pool_idx, r.val_set, r.probe_set, r.subsets = run_probe_sets(
        source, cfg.data.val_frac, cfg.data.split_seed, cfg.probe.images, cfg.probe.subsets,
        cfg.probe.seed, (budget.train, budget.val, budget.probe) if budget else None)
    if cfg.data.train_limit is not None:
        train_idx = train_idx[balanced_subset(source.labels[train_idx], cfg.data.train_limit,
                                              cfg.data.split_seed)]
    r.source = source
    r.train_set = source.subset(train_idx, f"{source.name}/train")
    r.probe_idx = r.subsets[0]  # probed during training too
    r.probe_images = r.probe_set.images[r.probe_idx]
    r.zs_tasks, r.zs_prompts = zeroshot_tasks(cfg.data.zeroshot, cfg.data.zeroshot_eval,
                                              image_size=size, progress=progress)
    rob = cfg.data.robustness
    r.robust = robustness_tasks(
        cfg.data.dataset, test, **rob.model_dump(), image_size=size,
        progress=progress) if rob else {}
    r.zs_weights = {name: text_classifier(r.clip, loaded.tokenizer, t.class_names, t.templates,
                                          device) for name, t in r.zs_tasks.items()}
    # forgetting during training: the same class-balanced images of each task at every point
    r.zs_subsets = {name: t.subset(balanced_subset(t.labels, cfg.probe.zeroshot_images,
                                                   cfg.probe.seed), f"{name}/subset")
                    for name, t in r.zs_tasks.items()} if cfg.probe.zeroshot_every else {}
    weights_file = Path(loaded.source) / "model.safetensors"
    r.record["provenance"].update({
        "model_source": loaded.source,
        "model_sha256": file_sha256(weights_file, 16) if weights_file.is_file() else None,
        "data": {"dataset": cfg.data.dataset, "content": source.fingerprint(),
                 "train_ids": index_fingerprint(train_idx), "val_ids": index_fingerprint(val_idx),
                 "probe_ids": [index_fingerprint(pool_idx[s]) for s in r.subsets],
                 "sizes": {"train": len(r.train_set), "val": len(r.val_set),
                           "probe": len(r.probe_idx)},
                 **({"probe_split_ids": index_fingerprint(pool_idx),
                     "budget": budget.model_dump()} if budget else {})},
        "zeroshot_data": {n: t.fingerprint() for n, t in r.zs_tasks.items()},
    })
    if r.zs_subsets:
        r.record["provenance"]["zeroshot_subsets"] = {
            n: {"images": len(t), "content": t.fingerprint()} for n, t in r.zs_subsets.items()}


def _prepare_model(r: _Run) -> None:
    """The classifier on the CLIP image tower, adapted as ``cfg.method`` says."""
    cfg = r.cfg
    torch.manual_seed(cfg.seed)  # head init and LoRA init depend only on the seed
    model = CLIPClassifier.from_clip(r.clip, r.source.num_classes).to(r.device)
    adapted = adapt(model, cfg.method,
                    **method_kwargs(cfg.method, cfg.model_dump()))
    r.model = adapted.model.to(r.device)
    n_trainable, n_total = count_parameters(r.model)
    r.record["provenance"]["parameters"] = {"trainable": n_trainable, "total": n_total}
    r.meta = {"run_id": r.record["run_id"], "method": cfg.method, "model": cfg.model}


def _prepare_optimisation(r: _Run) -> None:
    """Optimizer, schedule, step counts, probe points, data order generators, accumulators."""
    cfg, device, train_set = r.cfg, r.device, r.train_set
    r.params = [p for p in r.model.parameters() if p.requires_grad]
    # Training images small enough live on the device: a batch is then gathered there, with the
    # epoch's order copied over once, instead of on the host and copied from pageable memory on
    # every step (on the CPU, the same tensor).
    resident = (train_set.images.numel() * train_set.images.element_size()
                <= cfg.data.resident_mb * 2**20)
    r.train_images = train_set.images.to(device) if resident else train_set.images
    r.train_labels = train_set.labels.to(device) if resident else train_set.labels
    r.record["provenance"]["data"]["train_resident"] = resident
    # the training forward only: probes and evaluation hook into the plain module
    r.forward = (torch.compile(r.model, backend=cfg.train.compile) if cfg.train.compile
                 else r.model)
    r.optimizer = torch.optim.AdamW(r.params, lr=cfg.train.lr,
                                    weight_decay=cfg.train.weight_decay)
    r.bs = min(cfg.train.batch_size, len(train_set))
    # The study kept the ragged last batch (its loaders' drop_last=False): train.drop_last.
    r.steps_per_epoch = (len(train_set) // r.bs if cfg.train.drop_last
                         else math.ceil(len(train_set) / r.bs))
    r.epoch_images = r.steps_per_epoch * r.bs if cfg.train.drop_last else len(train_set)
    r.total_steps = r.steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        r.total_steps = min(r.total_steps, cfg.train.max_steps)
    r.scheduler = torch.optim.lr_scheduler.LambdaLR(
        r.optimizer, warmup_cosine(r.total_steps, cfg.train.warmup_frac))
    r.probe_at = set(probe_steps(r.steps_per_epoch, r.total_steps, cfg.probe.per_epoch))
    r.order_gen = torch.Generator().manual_seed(cfg.seed)
    r.flip_gen = torch.Generator().manual_seed(cfg.seed + 1)
    r.loss_sum = torch.zeros((), device=device)
    r.reg_sum = torch.zeros((), device=device)
    # fp16 gradients underflow without loss scaling (the study's AMP: autocast + GradScaler)
    r.scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None


def _pretrained_references(r: _Run) -> None:
    """What the regularizers and drift metrics compare with: taken from the pretrained model
    before any update, also on resume (the resumed weights are loaded after this)."""
    model, reg, cfg = r.model, r.reg, r.cfg
    r.pretrained_weights = vision_weight_snapshot(model) if "drift" in r.aux_which else None

    def cache() -> torch.Tensor:
        t = time.perf_counter()
        ref = attention_cache(model, r.train_set.images, r.preprocess, r.device,
                              cfg.probe.batch_size, reg.layers, cfg.probe.precision)
        r.timing["apr_cache_s"] = time.perf_counter() - t
        r.timing["apr_cache_mb"] = ref.numel() * ref.element_size() / 2**20
        return ref

    r.regularizer = regularizer(reg.name)
    r.reg_state = (r.regularizer.prepare(Pretrained(model, reg.layers, reg.ratio, r.device,
                                                    cache)) if r.regularizer else {})
    r.grab = (AttentionProbe(model.vision_model, reg.layers, detach=False)
              if r.regularizer and r.regularizer.attention else None)


def _baseline(r: _Run) -> dict[str, Any]:
    """Measure the pretrained model (attention on every probe subset, zero-shot, sanity of the
    class names, auxiliary metrics) and return the loop's initial state."""
    record, val_set = r.record, r.val_set
    probe_set = r.probe_set
    t = time.perf_counter()
    base_attn = r.probe_of(r.probe_images)
    record["baseline"] = summarize(base_attn)
    record["baseline"]["subsets"] = [record["baseline"]["mean"]] + [
        summarize(r.probe_of(probe_set.images[s]))["mean"] for s in r.subsets[1:]]
    probe_s = time.perf_counter() - t
    t = time.perf_counter()
    zs_before = r.zeroshot(r.zs_weights, r.zs_tasks, detail=True)
    own = text_classifier(r.clip, r.loaded.tokenizer, val_set.class_names, val_set.templates,
                          r.device)
    own_acc = r.zeroshot({"task": own}, {"task": val_set})["task"]
    record["sanity"], record["warnings"] = sanity_check(
        {f"{r.cfg.data.dataset} (validation)": (own_acc, val_set.num_classes),
         **{n: (zs_before[n]["top1"], t.num_classes) for n, t in r.zs_tasks.items()}})
    if r.zs_subsets:  # the trajectory's starting point, on the same subsets as the probes
        record["baseline"]["zeroshot_subset"] = r.zeroshot(r.zs_weights, r.zs_subsets)
    zeroshot_s = time.perf_counter() - t
    t = time.perf_counter()
    record["baseline"]["aux"], aux_ref = r.aux_of()
    return {"step": 0, "epoch": 0, "batch": 0, "perm": torch.empty(0, dtype=torch.long),
            "loss_count": 0, "best_val": -1.0, "best_epoch": 0, "train_s": 0.0,
            "probe_s": probe_s, "zeroshot_s": zeroshot_s,
            "aux_s": time.perf_counter() - t, "aux_ref": aux_ref,
            "zs_before": zs_before, "base_attn": base_attn[:ATTENTION_SAMPLES].cpu()}


def _restore(r: _Run, saved: dict[str, Any]) -> dict[str, Any]:
    """Resume: every tensor and counter the loop reads, exactly as it was saved."""
    r.model.load_state_dict(saved["model"], strict=False)
    r.optimizer.load_state_dict(saved["optimizer"])
    r.scheduler.load_state_dict(saved["scheduler"])
    r.order_gen.set_state(saved["order_gen"])
    r.flip_gen.set_state(saved["flip_gen"])
    torch.set_rng_state(saved["torch_rng"])
    if r.device.type == "cuda" and "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"], r.device)
    r.loss_sum += saved["loss_sum"].to(r.device)
    r.reg_sum += saved["reg_sum"].to(r.device)
    if r.scaler is not None:
        r.scaler.load_state_dict(saved["scaler"])
    return saved


def _write_best(r: _Run) -> None:
    if r.best:
        save_weights(r.out_dir / "best.safetensors", r.best.pop("state"),
                     {**r.meta, "epoch": str(r.best.pop("epoch"))})


def _checkpoint(r: _Run, state: dict[str, Any]) -> None:
    """Save the loop state (+ weights, optimizer, RNGs, history) and the record, atomically."""
    _write_best(r)  # the resume state may name a best epoch: its weights must be on disk
    blob = {**{k: v for k, v in state.items() if k not in ("model", "optimizer")},
            "model": trainable_state(r.model, "cpu"), "optimizer": r.optimizer.state_dict(),
            "scheduler": r.scheduler.state_dict(), "order_gen": r.order_gen.get_state(),
            "flip_gen": r.flip_gen.get_state(), "torch_rng": torch.get_rng_state(),
            "loss_sum": r.loss_sum.detach().cpu(), "reg_sum": r.reg_sum.detach().cpu(),
            "history": r.history}
    if r.device.type == "cuda":
        blob["cuda_rng"] = torch.cuda.get_rng_state(r.device)
    if r.scaler is not None:
        blob["scaler"] = r.scaler.state_dict()
    save_resume(r.out_dir, blob, r.record)
    write_record(r.out_dir / RECORD_FILE, r.record)


# --- training -----------------------------------------------------------------------------


def _train(r: _Run, state: dict[str, Any]) -> torch.Tensor:
    """The loop: step, log, probe, validate at epoch ends, checkpoint. Returns the last
    probe's attention (the final step is always a probe point)."""
    cfg, total_steps = r.cfg, r.total_steps
    if r.regularizer is not None:
        r.reg_state = r.regularizer.start(r.reg_state, r.record["baseline"]["entropy"]["layers"])
    r.board = open_board(r.out_dir, state["step"]) if cfg.tensorboard else None
    r.model.train()
    bar, task_id = progress_bar(r.progress, total_steps, state["step"],
                                f"{cfg.name} ({cfg.method})")
    last_attn = None  # set by every probe; a run always ends on one
    r.segment = (time.perf_counter(), _eval_s(state))  # training time excludes probes
    last_checkpoint = time.monotonic()
    with bar:
        while state["step"] < total_steps and not (r.guard and r.guard.should_stop):
            loss = _train_step(r, state)
            state["step"] += 1
            state["batch"] += 1
            step = state["step"]
            # Accumulate on the device; the host reads the loss only at log and probe points.
            r.loss_sum += loss.detach()
            state["loss_count"] += 1
            if step % cfg.train.log_every == 0 or step in r.probe_at or step == total_steps:
                bar.update(task_id, info=f"loss {_log_loss(r, state):.3f}")
            if step in r.probe_at:
                last_attn = _probe(r, state)
            bar.advance(task_id)
            epoch_done = state["batch"] == r.steps_per_epoch or step == total_steps
            if epoch_done:
                bar.update(task_id, info=f"val {_end_epoch(r, state):.3f}")
            every, minutes = cfg.train.checkpoint_every, cfg.train.checkpoint_minutes
            if step < total_steps and ((every and step % every == 0) or (
                    epoch_done and time.monotonic() - last_checkpoint >= 60 * minutes)):
                _add_train_time(r, state)
                _checkpoint(r, state)
                last_checkpoint = time.monotonic()
    _add_train_time(r, state)
    if state["step"] < total_steps:  # stopped by the guard: never trained past it on resume
        _checkpoint(r, state)
    return last_attn if last_attn is not None else r.probe_of(r.probe_images)


def _eval_s(state: dict[str, Any]) -> float:
    return state["probe_s"] + state["zeroshot_s"]


def _add_train_time(r: _Run, state: dict[str, Any]) -> None:
    """Add the wall time since the last call, less the probes' and zero-shot's share, to
    ``train_s``."""
    now = time.perf_counter()
    start, eval_s = r.segment
    state["train_s"] += now - start - (_eval_s(state) - eval_s)
    r.segment = (now, _eval_s(state))


def _train_step(r: _Run, state: dict[str, Any]) -> torch.Tensor:
    """One optimizer step on the next batch of the epoch's order; returns the loss."""
    cfg, device, reg, grab = r.cfg, r.device, r.reg, r.grab
    if state["batch"] == 0:
        state["perm"] = torch.randperm(len(r.train_set), generator=r.order_gen)
        r.perm_at = None
    if r.perm_at is None:
        r.perm_at = state["perm"].to(r.train_images.device)
    b, bs = state["batch"], r.bs
    idx = state["perm"][b * bs : (b + 1) * bs]
    at = r.perm_at[b * bs : (b + 1) * bs]
    flips = r.preprocess.draw_flips(len(idx), r.flip_gen) if cfg.train.flip else None
    x = r.preprocess(r.train_images[at].to(device, non_blocking=True), flip_mask=flips)
    y = r.train_labels[at].to(device, non_blocking=True)
    with autocast(device, cfg.train.precision), grab or contextlib.nullcontext():
        loss = F.cross_entropy(r.forward(x).float(), y)
    if r.regularizer is not None:
        # the gradient-carrying attention path; monitoring probes stay detached
        maps = renormalize_patches(grab.pop()) if grab is not None else None
        penalty = r.regularizer.penalty(r.reg_state, Batch(r.model, maps, idx, flips))
        loss = loss + reg.lam * penalty
        r.reg_sum += penalty.detach()
    r.optimizer.zero_grad(set_to_none=True)
    if r.scaler is None:
        loss.backward()
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(r.params, cfg.train.grad_clip)
        r.optimizer.step()
    else:  # clip the true gradients; a step with inf/NaN gradients is skipped, scale lowered
        r.scaler.scale(loss).backward()
        r.scaler.unscale_(r.optimizer)
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(r.params, cfg.train.grad_clip)
        r.scaler.step(r.optimizer)
        r.scaler.update()
    r.scheduler.step()
    return loss


def _log_loss(r: _Run, state: dict[str, Any]) -> float:
    """Append the mean loss (and penalty) since the last log to the history; raise
    `Diverged` on a NaN/inf. Returns the mean loss."""
    step, history = state["step"], r.history
    mean_loss = float(r.loss_sum) / state["loss_count"]
    if not math.isfinite(mean_loss):
        history["loss"].append({"step": step, "loss": None})
        raise Diverged(f"training loss became {mean_loss} at step {step} "
                       f"(lr={r.cfg.train.lr}); lower train.lr or check the data")
    entry = {"step": step, "loss": mean_loss, "lr": r.scheduler.get_last_lr()[0]}
    if r.reg.name != "none":
        entry["reg"] = float(r.reg_sum) / state["loss_count"]
        r.reg_sum.zero_()
    history["loss"].append(entry)
    if r.board is not None:
        for key in ("loss", "lr", "reg"):
            if key in entry:
                r.board.add_scalar(f"train/{key}", entry[key], step)
    r.loss_sum.zero_()
    state["loss_count"] = 0
    return mean_loss


def _probe(r: _Run, state: dict[str, Any]) -> torch.Tensor:
    """Probe the attention on the fixed probe images (and, every ``aux_every``-th time, the
    auxiliary metrics); append it to the history. Returns the attention."""
    t = time.perf_counter()
    step, history = state["step"], r.history
    attn = r.probe_of(r.probe_images)
    probe = {"step": step, "epoch": step / r.steps_per_epoch,
             "fraction": step / r.total_steps, "metrics": summarize(attn)}
    every, number = r.cfg.probe.aux_every, len(history["probes"]) + 1
    if every and number % every == 0:
        probe["aux"] = r.aux_of(state["aux_ref"], r.pretrained_weights)[0]
    state["probe_s"] += time.perf_counter() - t
    every = r.cfg.probe.zeroshot_every  # and at the last probe: the trajectory's end
    if every and (number % every == 0 or step == r.total_steps):
        t = time.perf_counter()
        probe["zeroshot"] = r.zeroshot(r.zs_weights, r.zs_subsets)
        state["zeroshot_s"] += time.perf_counter() - t
    history["probes"].append(probe)
    at_probe(r.guard, r.record, probe)
    if r.board is not None:
        board_metrics(r.board, probe["metrics"], r.record["baseline"], step)
        for name, acc in probe.get("zeroshot", {}).items():
            r.board.add_scalar(f"zeroshot_subset/{name}", acc, step)
    return attn


def _end_epoch(r: _Run, state: dict[str, Any]) -> float:
    """Validation accuracy at an epoch end; keep the best epoch's weights. Returns it."""
    cfg = r.cfg
    state["epoch"] += 1
    state["batch"] = 0
    val_acc = accuracy(r.model, r.val_set, r.preprocess, r.device, cfg.data.eval_batch_size,
                       cfg.train.precision)
    r.history["epochs"].append({"epoch": state["epoch"], "step": state["step"],
                                "val_acc": val_acc})
    if r.board is not None:
        r.board.add_scalar("val/accuracy", val_acc, state["step"])
    if val_acc > state["best_val"]:
        state["best_val"], state["best_epoch"] = val_acc, state["epoch"]
        if cfg.save_checkpoints:  # written at the next checkpoint or the end
            r.best.update(state=trainable_state(r.model, "cpu"), epoch=state["epoch"])
    return val_acc


# --- after training -----------------------------------------------------------------------


def _final_evaluation(r: _Run, state: dict[str, Any], final_attn: torch.Tensor) -> None:
    """Measure the trained model (probe subsets, zero-shot, auxiliary metrics, the test split
    read once), write the weights and attention samples, and fill in the record."""
    cfg, history, probe_set = r.cfg, r.history, r.probe_set
    step = state["step"]
    # the final step is always a probe point: its probe already measured the final model
    final_metrics = history["probes"][-1]["metrics"]
    final_subsets = [final_metrics["mean"]] + [
        summarize(r.probe_of(probe_set.images[s]))["mean"] for s in r.subsets[1:]]
    t = time.perf_counter()
    zs_after = r.zeroshot(r.zs_weights, r.zs_tasks, detail=True)
    zeroshot_s = state["zeroshot_s"] + time.perf_counter() - t
    t = time.perf_counter()
    final_aux = r.aux_of(state["aux_ref"], r.pretrained_weights)[0]
    aux_s = state["aux_s"] + time.perf_counter() - t
    test_set = load_task(cfg.data.dataset, "test", image_size=r.image_size)  # read once
    test_acc = accuracy(r.model, test_set, r.preprocess, r.device, cfg.data.eval_batch_size,
                        cfg.train.precision)
    if r.robust:  # corrupted test splits, scored like the test split
        r.record["robustness"] = robustness_summary(
            {n: accuracy(r.model, t, r.preprocess, r.device, cfg.data.eval_batch_size,
                         cfg.train.precision) for n, t in r.robust.items()}, test_acc, r.robust)
    _write_best(r)
    if cfg.save_checkpoints:
        save_weights(r.out_dir / "final.safetensors", trainable_state(r.model, "cpu"),
                     {**r.meta, "step": str(step)})
    save_weights(r.out_dir / "attention.safetensors",
                 {"pretrained": state["base_attn"], "final": final_attn[:ATTENTION_SAMPLES],
                  "labels": probe_set.labels[r.probe_idx][:ATTENTION_SAMPLES],
                  "images": r.probe_images[:ATTENTION_SAMPLES]}, r.meta)
    _record_final(r, state, final_subsets, final_aux, test_acc)
    _record_zeroshot(r, state["zs_before"], zs_after)
    if r.board is not None:
        board_metrics(r.board, final_metrics, r.record["baseline"], step)
        for name, z in r.record["zeroshot"].items():
            r.board.add_scalar(f"zeroshot/{name}", z["after"], step)
        r.board.add_scalar("test/accuracy", test_acc, step)
        r.board.close()
    train_s = state["train_s"]
    r.timing.update({"train_s": train_s, "probe_s": state["probe_s"],
                     "zeroshot_s": zeroshot_s, "aux_s": aux_s,
                     "steps": step, "probes": len(history["probes"]) + 1,
                     "train_images_per_s": step * r.epoch_images / r.steps_per_epoch / train_s
                     if train_s > 0 else None})


def _record_final(r: _Run, state: dict[str, Any], final_subsets: list[dict[str, float]],
                  final_aux: dict[str, Any], test_acc: float) -> None:
    """``record["final"]``: accuracies, final attention and its drift from the baseline."""
    history = r.history
    final_metrics = history["probes"][-1]["metrics"]
    drift = drift_summary(final_metrics, r.record["baseline"], final_subsets)
    subset_cv = drift.pop("subset_cv")
    r.record["final"] = {
        "step": state["step"], "epochs": state["step"] / r.steps_per_epoch,
        "val_acc": history["epochs"][-1]["val_acc"] if history["epochs"] else None,
        "best_val_acc": state["best_val"], "best_epoch": state["best_epoch"],
        "test_acc": test_acc,
        "train_loss": history["loss"][-1]["loss"] if history["loss"] else None,
        "metrics": final_metrics,
        **drift,
        # auxiliary analyses, and how much the core metrics depend on which probe subset is
        # used (coefficient of variation over the fixed subsets)
        "aux": {**final_aux, "subset_cv": subset_cv},
    }


def _record_zeroshot(r: _Run, before: dict[str, float], after: dict[str, float]) -> None:
    r.record["zeroshot"] = zeroshot_summary(before, after, r.zs_tasks, r.zs_prompts)
