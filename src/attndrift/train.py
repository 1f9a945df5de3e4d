"""The one explicit training loop: config -> fine-tuned classifier -> run record.

`_run` is the sequence of phases, read top to bottom: the set-up (`attndrift.run_setup`:
data, model, optimisation, pretrained references, into a `Setup` the loop only reads), the
baseline (or a restored checkpoint), the loop, which trains with AdamW + warmup/cosine while
probing attention on a fixed validation subset, and the final evaluation
(`attndrift.phases`), which writes the weights and fills in the record.

Everything the loop mutates is one `LoopState`, which is exactly what is saved atomically to
``resume.pt`` at the first epoch end ``train.checkpoint_minutes`` after the previous save (and
every ``train.checkpoint_every`` steps): a killed run called again with the same config
continues from there and ends with the same weights and record as an uninterrupted one (on CPU;
GPU kernels may differ in the last bits). The best epoch's weights are kept in host memory and
written to ``best.safetensors`` with each checkpoint and at the end; with
``eval.checkpoint: best`` they are restored before the final evaluation.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attndrift.config import RunConfig, identity
from attndrift.evaluate import accuracy, autocast
from attndrift.guard import Guard, at_probe, for_run
from attndrift.models.classifier import trainable_state
from attndrift.probes.metrics import renormalize_patches, summarize
from attndrift.records import (
    RECORD_FILE,
    RunRecord,
    provenance,
    run_id_for,
    write_record,
)
from attndrift.regularizers import Batch
from attndrift.run_final import final_evaluation as _final_evaluation  # a phase of _run
from attndrift.run_setup import Setup, measure_baseline, prepare, probe_steps, warmup_cosine
from attndrift.runtime import (
    RESUME_FILE,
    BestWeights,
    LoopState,
    board_metrics,
    load_resume,
    progress_bar,
    save_resume,
    select_device,
)
from attndrift.trackers import Opening, Trackers, open_trackers, tracker_names

__all__ = ["Diverged", "probe_steps", "run", "warmup_cosine"]


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


def run(cfg: RunConfig, out_dir: str | Path, *, progress: bool = True,
        resume: bool = True) -> dict[str, Any]:
    """Fine-tune as ``cfg`` says and write ``out_dir/record.json`` (+ checkpoints).

    With ``resume`` (default) an interrupted run of the same config in ``out_dir`` continues
    from its last checkpoint. Returns the record (its JSON form). A diverged run (NaN/inf loss)
    returns with status ``diverged``; any other failure is recorded as ``failed`` and
    re-raised.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = cfg.model_dump(mode="json")
    run_id = run_id_for(identity(config))
    saved = load_resume(out_dir, run_id) if resume else None
    record = RunRecord.from_json(saved[1]) if saved else RunRecord(run_id, config)
    t_start = time.perf_counter()
    timing = record.timing
    try:
        _run(cfg, out_dir, record, saved[0] if saved else None, progress=progress)
    except Diverged as err:
        record.status = "diverged"
        record.error = str(err)
    except BaseException as err:
        # Ctrl-C / SIGTERM (the CLI turns it into KeyboardInterrupt): resumable, not a failure
        stopped = isinstance(err, KeyboardInterrupt)
        record.status = "interrupted" if stopped else "failed"
        record.error = "interrupted" if stopped else f"{type(err).__name__}: {err}"
        record.traceback = "" if stopped else traceback.format_exc()
        timing["total_s"] = timing.get("total_s", 0.0) + time.perf_counter() - t_start
        with contextlib.suppress(OSError):  # a full disk: the original error is the one to see
            write_record(out_dir / RECORD_FILE, record)
        raise
    else:
        record.status = "completed"
    timing["total_s"] = timing.get("total_s", 0.0) + time.perf_counter() - t_start
    write_record(out_dir / RECORD_FILE, record)
    (out_dir / RESUME_FILE).unlink(missing_ok=True)  # a finished run needs no resume state
    return record.to_json()


@dataclass
class _Live:
    """What the loop keeps besides `LoopState` and does not save: derived on every start."""

    best: BestWeights
    board: Trackers  # experiment trackers (`attndrift.trackers`; none: writes nothing)
    guard: Guard | None = None  # early-warning guard (None without a guard section)
    segment: tuple[float, float] = (0.0, 0.0)  # (wall clock, evaluation seconds) at last count
    perm_at: torch.Tensor | None = None  # the epoch's order where the images are


def _run(cfg: RunConfig, out_dir: Path, record: RunRecord, saved: dict[str, Any] | None,
         *, progress: bool) -> None:
    """The run's phases, in order."""
    device = select_device(cfg.device)
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ValueError(f"train.precision=fp16 (autocast + GradScaler) needs a CUDA device, "
                         f"got {device}; use train.precision=bf16 or fp32")
    if saved is None:
        record.provenance = provenance(str(device))
        write_record(out_dir / RECORD_FILE, record)  # status "running": the run has started
    else:
        record.timing["resumed"] = record.timing.get("resumed", 0) + 1
    torch.manual_seed(cfg.seed)
    guard = for_run(cfg, record)  # its crossings restored from a resumed record
    s = prepare(cfg, out_dir, record, device, progress)
    state = measure_baseline(s) if saved is None else _restore(s, saved)
    board = open_trackers(
        tracker_names(cfg.trackers, cfg.tensorboard),
        Opening(out_dir, record.run_id, cfg.name or record.run_id, state.step, record.config),
        warn=lambda line: _warn_once(record, line))
    live = _Live(BestWeights(out_dir, s.meta), board, guard)
    try:
        last_attn = _train(s, state, live)
        # the test accuracy goes through this module's `accuracy`, as the validation does
        _final_evaluation(s, state, live.best, live.board, last_attn, accuracy)
    except BaseException as err:
        # a tracker that cannot close (its server gone) must not hide why the run stopped
        with contextlib.suppress(Exception):
            live.board.close("killed" if isinstance(err, KeyboardInterrupt) else "failed")
        raise
    live.board.close("finished")


def _warn_once(record: RunRecord, line: str) -> None:
    """A warning on stderr and in the record's ``warnings`` (once, across resumes)."""
    warnings.warn(line, stacklevel=2)
    if line not in (record.warnings or []):
        record.warnings = [*(record.warnings or []), line]


def _restore(s: Setup, saved: dict[str, Any]) -> LoopState:
    """Resume: every tensor and counter the loop reads, exactly as it was saved."""
    s.model.load_state_dict(saved["model"], strict=False)
    s.optimizer.load_state_dict(saved["optimizer"])
    s.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    if s.device.type == "cuda" and "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"], s.device)
    if s.scaler is not None:
        s.scaler.load_state_dict(saved["scaler"])
    return LoopState.restored(saved, s.device, s.cfg.seed)


def _checkpoint(s: Setup, state: LoopState, live: _Live) -> None:
    """Save the loop state (+ weights, optimizer, RNGs, history) and the record, atomically."""
    live.best.write()  # the resume state may name a best epoch: its weights must be on disk
    objects = {"model": trainable_state(s.model, "cpu"), "optimizer": s.optimizer.state_dict(),
               "scheduler": s.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
    if s.device.type == "cuda":
        objects["cuda_rng"] = torch.cuda.get_rng_state(s.device)
    if s.scaler is not None:
        objects["scaler"] = s.scaler.state_dict()
    save_resume(s.out_dir, state.saved(objects), s.record.to_json())
    write_record(s.out_dir / RECORD_FILE, s.record)


# --- training -----------------------------------------------------------------------------


def _train(s: Setup, state: LoopState, live: _Live) -> torch.Tensor:
    """The loop: step, log, probe, validate at epoch ends, checkpoint. Returns the last
    probe's attention (the final step is always a probe point)."""
    cfg, total_steps = s.cfg, s.total_steps
    if s.regularizer is not None:  # targets that depend on the baseline (entropy floors)
        s.reg_state = s.regularizer.start(s.reg_state, s.record.baseline["entropy"]["layers"])
    s.model.train()
    bar, task_id = progress_bar(s.progress, total_steps, state.step,
                                f"{cfg.name} ({cfg.method})")
    last_attn = None  # set by every probe; a run always ends on one
    live.segment = (time.perf_counter(), _eval_s(state))  # training time excludes probes
    last_checkpoint = time.monotonic()
    with bar:
        while state.step < total_steps and not (live.guard and live.guard.should_stop):
            loss = _train_step(s, state, live)
            state.step += 1
            state.batch += 1
            step = state.step
            # Accumulate on the device; the host reads the loss only at log and probe points.
            state.loss_sum += loss.detach()
            state.loss_count += 1
            if step % cfg.train.log_every == 0 or step in s.probe_at or step == total_steps:
                bar.update(task_id, info=f"loss {_log_loss(s, state, live):.3f}")
            if step in s.probe_at:
                last_attn = _probe(s, state, live)
            bar.advance(task_id)
            epoch_done = state.batch == s.steps_per_epoch or step == total_steps
            if epoch_done:
                bar.update(task_id, info=f"val {_end_epoch(s, state, live):.3f}")
            every, minutes = cfg.train.checkpoint_every, cfg.train.checkpoint_minutes
            if step < total_steps and ((every and step % every == 0) or (
                    epoch_done and time.monotonic() - last_checkpoint >= 60 * minutes)):
                _add_train_time(state, live)
                _checkpoint(s, state, live)
                last_checkpoint = time.monotonic()
    _add_train_time(state, live)
    if state.step < total_steps:  # stopped by the guard: never trained past it on resume
        _checkpoint(s, state, live)
    return last_attn if last_attn is not None else s.probe_of(s.probe_images)


def _eval_s(state: LoopState) -> float:
    return state.probe_s + state.zeroshot_s


def _add_train_time(state: LoopState, live: _Live) -> None:
    """Add the wall time since the last call, less the probes' and zero-shot's share, to
    ``train_s``."""
    now = time.perf_counter()
    start, eval_s = live.segment
    state.train_s += now - start - (_eval_s(state) - eval_s)
    live.segment = (now, _eval_s(state))


def _train_step(s: Setup, state: LoopState, live: _Live) -> torch.Tensor:
    """One optimizer step on the next batch of the epoch's order; returns the loss."""
    cfg, device, reg, grab = s.cfg, s.device, s.reg, s.grab
    if state.batch == 0:
        state.perm = torch.randperm(len(s.train_set), generator=state.order_gen)
        live.perm_at = None
    if live.perm_at is None:
        live.perm_at = state.perm.to(s.train_images.device)
    b, bs = state.batch, s.bs
    idx = state.perm[b * bs : (b + 1) * bs]
    at = live.perm_at[b * bs : (b + 1) * bs]
    flips = s.preprocess.draw_flips(len(idx), state.flip_gen) if cfg.train.flip else None
    x = s.preprocess(s.train_images[at].to(device, non_blocking=True), flip_mask=flips)
    y = s.train_labels[at].to(device, non_blocking=True)
    with autocast(device, cfg.train.precision), grab or contextlib.nullcontext():
        loss = F.cross_entropy(s.forward(x).float(), y)
    if s.regularizer is not None:
        # the gradient-carrying attention path; monitoring probes stay detached
        maps = renormalize_patches(grab.pop()) if grab is not None else None
        penalty = s.regularizer.penalty(s.reg_state, Batch(s.model, maps, idx, flips))
        loss = loss + reg.lam * penalty
        state.reg_sum += penalty.detach()
    s.optimizer.zero_grad(set_to_none=True)
    if s.scaler is None:
        loss.backward()
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(s.params, cfg.train.grad_clip)
        s.optimizer.step()
    else:  # clip the true gradients; a step with inf/NaN gradients is skipped, scale lowered
        s.scaler.scale(loss).backward()
        s.scaler.unscale_(s.optimizer)
        if cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(s.params, cfg.train.grad_clip)
        s.scaler.step(s.optimizer)
        s.scaler.update()
    s.scheduler.step()
    return loss


def _log_loss(s: Setup, state: LoopState, live: _Live) -> float:
    """Append the mean loss (and penalty) since the last log to the history; raise
    `Diverged` on a NaN/inf. Returns the mean loss."""
    step, history = state.step, state.history
    mean_loss = float(state.loss_sum) / state.loss_count
    if not math.isfinite(mean_loss):
        history["loss"].append({"step": step, "loss": None})
        raise Diverged(f"training loss became {mean_loss} at step {step} "
                       f"(lr={s.cfg.train.lr}); lower train.lr or check the data")
    entry = {"step": step, "loss": mean_loss, "lr": s.scheduler.get_last_lr()[0]}
    if s.reg.name != "none":
        entry["reg"] = float(state.reg_sum) / state.loss_count
        state.reg_sum.zero_()
    history["loss"].append(entry)
    if live.board:
        for key in ("loss", "lr", "reg"):
            if key in entry:
                live.board.scalar(f"train/{key}", entry[key], step)
    state.loss_sum.zero_()
    state.loss_count = 0
    return mean_loss


def _probe(s: Setup, state: LoopState, live: _Live) -> torch.Tensor:
    """Probe the attention on the fixed probe images (and, every ``aux_every``-th time, the
    auxiliary metrics); append it to the history. Returns the attention."""
    t = time.perf_counter()
    step, history = state.step, state.history
    attn = s.probe_of(s.probe_images)
    probe = {"step": step, "epoch": step / s.steps_per_epoch,
             "fraction": step / s.total_steps, "metrics": summarize(attn)}
    every, number = s.cfg.probe.period(s.cfg.probe.aux_every), len(history["probes"]) + 1
    if every and number % every == 0:
        probe["aux"] = s.aux_of(state.aux_ref, s.pretrained_weights)[0]
    state.probe_s += time.perf_counter() - t
    # zero-shot on the fixed subsets, also at the last probe (the trajectory's end)
    every = s.cfg.probe.period(s.cfg.probe.zeroshot_every)
    if every and (number % every == 0 or step == s.total_steps):
        t = time.perf_counter()
        probe["zeroshot"] = s.zeroshot(s.zs_weights, s.zs_subsets)
        state.zeroshot_s += time.perf_counter() - t
    history["probes"].append(probe)
    at_probe(live.guard, s.record, probe)
    if live.board:
        board_metrics(live.board, probe["metrics"], s.record.baseline, step)
        for name, acc in probe.get("zeroshot", {}).items():
            live.board.scalar(f"zeroshot_subset/{name}", acc, step)
    return attn


def _end_epoch(s: Setup, state: LoopState, live: _Live) -> float:
    """Validation accuracy at an epoch end; keep the best epoch's weights. Returns it."""
    cfg = s.cfg
    state.epoch += 1
    state.batch = 0
    val_acc = accuracy(s.model, s.val_set, s.preprocess, s.device, cfg.data.eval_batch_size,
                       cfg.train.precision)
    state.history["epochs"].append({"epoch": state.epoch, "step": state.step,
                                    "val_acc": val_acc})
    if live.board:
        live.board.scalar("val/accuracy", val_acc, state.step)
    if val_acc > state.best_val:
        state.best_val, state.best_epoch = val_acc, state.epoch
        if cfg.save_checkpoints or cfg.eval.checkpoint == "best":
            live.best.keep(trainable_state(s.model, "cpu"), state.epoch)  # written later
    return val_acc
