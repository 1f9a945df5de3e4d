"""The one explicit training loop: config -> fine-tuned classifier -> run record.

Reads top to bottom: load model and data, measure the pretrained baseline (attention metrics,
zero-shot), train with AdamW + warmup/cosine while probing attention on a fixed validation
subset, then measure again and write the record and checkpoints.

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
from attndrift.data.registry import load_task
from attndrift.data.splits import (
    balanced_subset,
    index_fingerprint,
    probe_subsets,
    stratified_split,
)
from attndrift.evaluate import (
    accuracy,
    attention_cache,
    autocast,
    auxiliary_metrics,
    coefficient_of_variation,
    probe_attention,
    sanity_check,
    zeroshot_all,
)
from attndrift.models.adapt import adapt, method_kwargs
from attndrift.models.classifier import CLIPClassifier, count_parameters, trainable_state
from attndrift.models.clip import load_clip
from attndrift.probes.capture import AttentionProbe
from attndrift.probes.drift import vision_weight_snapshot
from attndrift.probes.metrics import METRICS, delta_pct, renormalize_patches, summarize
from attndrift.records import (
    RECORD_FILE,
    file_sha256,
    new_record,
    provenance,
    run_id_for,
    write_record,
)
from attndrift.regularizers import (
    apr_loss,
    entropy_floor_loss,
    entropy_floor_targets,
    l2sp_loss,
)
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


def _run(cfg: RunConfig, out_dir: Path, record: dict[str, Any], saved: dict[str, Any] | None,
         *, progress: bool) -> None:
    timing = record["timing"]
    t0 = time.perf_counter()
    device = select_device(cfg.device)
    if saved is None:
        record["provenance"] = provenance(str(device))
        write_record(out_dir / RECORD_FILE, record)  # status "running": the run has started
    else:
        timing["resumed"] = timing.get("resumed", 0) + 1
    torch.manual_seed(cfg.seed)

    # --- model and data -----------------------------------------------------------------
    loaded = load_clip(cfg.model)
    clip = loaded.model.to(device)
    clip.requires_grad_(False)  # text tower, logit scale: always frozen
    preprocess = loaded.preprocessor()
    size = loaded.image_size
    source = load_task(cfg.data.dataset, "train", image_size=size, progress=progress)
    # decoded (and cached) now, read at the end: a bad test image stops the run before training
    load_task(cfg.data.dataset, "test", image_size=size, progress=progress)
    train_idx, val_idx = stratified_split(source.labels, cfg.data.val_frac, cfg.data.split_seed)
    if cfg.data.train_limit is not None:
        train_idx = train_idx[balanced_subset(source.labels[train_idx], cfg.data.train_limit,
                                              cfg.data.split_seed)]
    train_set = source.subset(train_idx, f"{source.name}/train")
    val_set = source.subset(val_idx, f"{source.name}/val")
    subsets = probe_subsets(val_set.labels, cfg.probe.images, cfg.probe.subsets, cfg.probe.seed)
    probe_idx = subsets[0]  # probed during training too
    probe_images = val_set.images[probe_idx]
    zs_tasks = {name: load_task(name, "test", image_size=size, progress=progress)
                for name in cfg.data.zeroshot}
    zs_weights = {name: text_classifier(clip, loaded.tokenizer, t.class_names, t.templates,
                                        device) for name, t in zs_tasks.items()}
    weights_file = Path(loaded.source) / "model.safetensors"
    record["provenance"].update({
        "model_source": loaded.source,
        "model_sha256": file_sha256(weights_file, 16) if weights_file.is_file() else None,
        "data": {"dataset": cfg.data.dataset, "content": source.fingerprint(),
                 "train_ids": index_fingerprint(train_idx), "val_ids": index_fingerprint(val_idx),
                 "probe_ids": [index_fingerprint(val_idx[s]) for s in subsets],
                 "sizes": {"train": len(train_set), "val": len(val_set),
                           "probe": len(probe_idx)}},
        "zeroshot_data": {n: t.fingerprint() for n, t in zs_tasks.items()},
    })

    torch.manual_seed(cfg.seed)  # head init and LoRA init depend only on the seed
    model = CLIPClassifier.from_clip(clip, source.num_classes).to(device)
    adapted = adapt(model, cfg.method,
                    **method_kwargs(cfg.method, cfg.lora.model_dump(), cfg.freeze_layers))
    model = adapted.model.to(device)
    n_trainable, n_total = count_parameters(model)
    record["provenance"]["parameters"] = {"trainable": n_trainable, "total": n_total}
    timing["setup_s"] = timing.get("setup_s", 0.0) + time.perf_counter() - t0

    # --- optimisation set-up ------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    # Training images small enough live on the device: a batch is then gathered there, with the
    # epoch's order copied over once, instead of on the host and copied from pageable memory on
    # every step (on the CPU, the same tensor).
    resident = (train_set.images.numel() * train_set.images.element_size()
                <= cfg.data.resident_mb * 2**20)
    train_images = train_set.images.to(device) if resident else train_set.images
    train_labels = train_set.labels.to(device) if resident else train_set.labels
    record["provenance"]["data"]["train_resident"] = resident
    # the training forward only: probes and evaluation hook into the plain module
    forward = torch.compile(model, backend=cfg.train.compile) if cfg.train.compile else model
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    bs = min(cfg.train.batch_size, len(train_set))
    steps_per_epoch = len(train_set) // bs  # drop the ragged last batch, as the study did
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, cfg.train.warmup_frac))
    probe_at = set(probe_steps(steps_per_epoch, total_steps, cfg.probe.per_epoch))
    order_gen = torch.Generator().manual_seed(cfg.seed)
    flip_gen = torch.Generator().manual_seed(cfg.seed + 1)
    loss_sum = torch.zeros((), device=device)
    reg_sum = torch.zeros((), device=device)
    meta = {"run_id": record["run_id"], "method": cfg.method, "model": cfg.model}

    # --- references to the pretrained model: taken before any update, also on resume ----
    reg, aux_which = cfg.regularizer, list(cfg.probe.aux)
    pretrained_weights = vision_weight_snapshot(model) if "drift" in aux_which else None
    l2sp_ref = {n: p.detach().clone() for n, p in model.named_parameters()
                if p.requires_grad and not n.startswith("head.")} if reg.name == "l2sp" else {}
    apr_ref = None
    if reg.name == "apr":
        t = time.perf_counter()
        apr_ref = attention_cache(model, train_set.images, preprocess, device,
                                  cfg.probe.batch_size, reg.layers, cfg.probe.precision)
        timing["apr_cache_s"] = time.perf_counter() - t
        timing["apr_cache_mb"] = apr_ref.numel() * apr_ref.element_size() / 2**20
    grab = (AttentionProbe(model.vision_model, reg.layers, detach=False)
            if reg.name in ("apr", "entropy_floor") else None)

    def probe_of(images: torch.Tensor) -> torch.Tensor:  # the attention probe, as configured
        return probe_attention(model, images, preprocess, device, cfg.probe.batch_size,
                               cfg.probe.precision, on_device=True)  # summarized there

    def aux_of(reference=None, weights=None) -> tuple[dict[str, Any], dict[str, Any]]:
        return auxiliary_metrics(model, probe_images, preprocess, device, cfg.probe.batch_size,
                                 aux_which, reference, weights, cfg.probe.precision)

    if saved is None:
        # --- pretrained baseline --------------------------------------------------------
        t = time.perf_counter()
        base_attn = probe_of(probe_images)
        record["baseline"] = summarize(base_attn)
        record["baseline"]["subsets"] = [record["baseline"]["mean"]] + [
            summarize(probe_of(val_set.images[s]))["mean"] for s in subsets[1:]]
        probe_s = time.perf_counter() - t
        t = time.perf_counter()
        zs_before = zeroshot_all(model, zs_weights, zs_tasks, preprocess, device,
                                 cfg.data.eval_batch_size, cfg.train.precision)
        own = text_classifier(clip, loaded.tokenizer, val_set.class_names, val_set.templates,
                              device)
        own_acc = zeroshot_all(model, {"task": own}, {"task": val_set}, preprocess, device,
                               cfg.data.eval_batch_size, cfg.train.precision)["task"]
        record["sanity"], record["warnings"] = sanity_check(
            {f"{cfg.data.dataset} (validation)": (own_acc, val_set.num_classes),
             **{n: (zs_before[n], t.num_classes) for n, t in zs_tasks.items()}})
        zeroshot_s = time.perf_counter() - t
        t = time.perf_counter()
        record["baseline"]["aux"], aux_ref = aux_of()
        state = {"step": 0, "epoch": 0, "batch": 0, "perm": torch.empty(0, dtype=torch.long),
                 "loss_count": 0, "best_val": -1.0, "best_epoch": 0, "train_s": 0.0,
                 "probe_s": probe_s, "zeroshot_s": zeroshot_s,
                 "aux_s": time.perf_counter() - t, "aux_ref": aux_ref,
                 "zs_before": zs_before, "base_attn": base_attn[:ATTENTION_SAMPLES].cpu()}
    else:
        # --- resume: every tensor and counter the loop reads, exactly as it was saved ---
        state = saved
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        order_gen.set_state(state["order_gen"])
        flip_gen.set_state(state["flip_gen"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        loss_sum += state["loss_sum"].to(device)
        reg_sum += state["reg_sum"].to(device)
    history = record["history"]
    tau = None
    if reg.name == "entropy_floor":
        layers = reg.layers if reg.layers is not None else range(
            len(record["baseline"]["entropy"]["layers"]))
        tau = entropy_floor_targets([record["baseline"]["entropy"]["layers"][i] for i in layers],
                                    reg.ratio).to(device)
    board = open_board(out_dir, state["step"]) if cfg.tensorboard else None

    best: dict[str, Any] = {}  # improved trainable state not yet on disk (CPU copy) + its epoch

    def write_best() -> None:
        if best:
            save_weights(out_dir / "best.safetensors", best.pop("state"),
                         {**meta, "epoch": str(best.pop("epoch"))})

    def checkpoint() -> None:
        write_best()  # the resume state may name a best epoch: its weights must be on disk
        blob = {**{k: v for k, v in state.items() if k not in ("model", "optimizer")},
                "model": trainable_state(model, "cpu"), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "order_gen": order_gen.get_state(),
                "flip_gen": flip_gen.get_state(), "torch_rng": torch.get_rng_state(),
                "loss_sum": loss_sum.detach().cpu(), "reg_sum": reg_sum.detach().cpu(),
                "history": history}
        if device.type == "cuda":
            blob["cuda_rng"] = torch.cuda.get_rng_state(device)
        save_resume(out_dir, blob, record)
        write_record(out_dir / RECORD_FILE, record)

    # --- training -----------------------------------------------------------------------
    model.train()
    bar, task_id = progress_bar(progress, total_steps, state["step"], f"{cfg.name} ({cfg.method})")
    last_attn = None  # set by every probe; a run always ends on one
    segment_start, segment_probe_s = time.perf_counter(), state["probe_s"]
    last_checkpoint = time.monotonic()
    perm_at = None  # the epoch's order where the training images are, copied once per epoch
    with bar:
        while state["step"] < total_steps:
            if state["batch"] == 0:
                state["perm"] = torch.randperm(len(train_set), generator=order_gen)
                perm_at = None
            if perm_at is None:
                perm_at = state["perm"].to(train_images.device)
            perm, b = state["perm"], state["batch"]
            idx = perm[b * bs : (b + 1) * bs]
            at = perm_at[b * bs : (b + 1) * bs]
            flips = preprocess.draw_flips(len(idx), flip_gen) if cfg.train.flip else None
            x = preprocess(train_images[at].to(device, non_blocking=True), flip_mask=flips)
            y = train_labels[at].to(device, non_blocking=True)
            with autocast(device, cfg.train.precision), grab or contextlib.nullcontext():
                loss = F.cross_entropy(forward(x).float(), y)
            if reg.name != "none":
                # the gradient-carrying attention path; monitoring probes stay detached
                if reg.name == "apr":
                    ref = apr_ref[idx, flips.long() if flips is not None else 0]
                    penalty = apr_loss(renormalize_patches(grab.pop()),
                                       ref.to(device, torch.float32, non_blocking=True))
                elif reg.name == "entropy_floor":
                    penalty = entropy_floor_loss(renormalize_patches(grab.pop()), tau)
                else:
                    penalty = l2sp_loss({n: p for n, p in model.named_parameters()
                                         if n in l2sp_ref}, l2sp_ref)
                loss = loss + reg.lam * penalty
                reg_sum += penalty.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            state["batch"] += 1
            step = state["step"]
            # Accumulate on the device; the host reads the loss only at log and probe points.
            loss_sum += loss.detach()
            state["loss_count"] += 1
            if step % cfg.train.log_every == 0 or step in probe_at or step == total_steps:
                mean_loss = float(loss_sum) / state["loss_count"]
                if not math.isfinite(mean_loss):
                    history["loss"].append({"step": step, "loss": None})
                    raise Diverged(f"training loss became {mean_loss} at step {step} "
                                   f"(lr={cfg.train.lr}); lower train.lr or check the data")
                entry = {"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0]}
                if reg.name != "none":
                    entry["reg"] = float(reg_sum) / state["loss_count"]
                    reg_sum.zero_()
                history["loss"].append(entry)
                if board is not None:
                    for key in ("loss", "lr", "reg"):
                        if key in entry:
                            board.add_scalar(f"train/{key}", entry[key], step)
                loss_sum.zero_()
                state["loss_count"] = 0
                bar.update(task_id, info=f"loss {mean_loss:.3f}")
            if step in probe_at:
                t = time.perf_counter()
                last_attn = probe_of(probe_images)
                probe = {"step": step, "epoch": step / steps_per_epoch,
                         "fraction": step / total_steps, "metrics": summarize(last_attn)}
                every = cfg.probe.aux_every
                if every and (len(history["probes"]) + 1) % every == 0:
                    probe["aux"] = aux_of(state["aux_ref"], pretrained_weights)[0]
                history["probes"].append(probe)
                if board is not None:
                    board_metrics(board, probe["metrics"], record["baseline"], step)
                state["probe_s"] += time.perf_counter() - t
            bar.advance(task_id)
            epoch_done = state["batch"] == steps_per_epoch or step == total_steps
            if epoch_done:
                state["epoch"] += 1
                state["batch"] = 0
                val_acc = accuracy(model, val_set, preprocess, device,
                                   cfg.data.eval_batch_size, cfg.train.precision)
                history["epochs"].append({"epoch": state["epoch"], "step": step,
                                          "val_acc": val_acc})
                if board is not None:
                    board.add_scalar("val/accuracy", val_acc, step)
                bar.update(task_id, info=f"val {val_acc:.3f}")
                if val_acc > state["best_val"]:
                    state["best_val"], state["best_epoch"] = val_acc, state["epoch"]
                    if cfg.save_checkpoints:  # written at the next checkpoint or the end
                        best.update(state=trainable_state(model, "cpu"), epoch=state["epoch"])
            every, minutes = cfg.train.checkpoint_every, cfg.train.checkpoint_minutes
            if step < total_steps and ((every and step % every == 0) or (
                    epoch_done and time.monotonic() - last_checkpoint >= 60 * minutes)):
                now = time.perf_counter()
                state["train_s"] += now - segment_start - (state["probe_s"] - segment_probe_s)
                segment_start, segment_probe_s = now, state["probe_s"]
                checkpoint()
                last_checkpoint = time.monotonic()
    state["train_s"] += time.perf_counter() - segment_start - (state["probe_s"] - segment_probe_s)

    # --- after training -----------------------------------------------------------------
    step = state["step"]
    # the final step is always a probe point: its probe already measured the final model
    final_attn, final_metrics = last_attn, history["probes"][-1]["metrics"]
    final_subsets = [final_metrics["mean"]] + [
        summarize(probe_of(val_set.images[s]))["mean"] for s in subsets[1:]]
    t = time.perf_counter()
    zs_before = state["zs_before"]
    zs_after = zeroshot_all(model, zs_weights, zs_tasks, preprocess, device,
                            cfg.data.eval_batch_size, cfg.train.precision)
    zeroshot_s = state["zeroshot_s"] + time.perf_counter() - t
    t = time.perf_counter()
    final_aux = aux_of(state["aux_ref"], pretrained_weights)[0]
    aux_s = state["aux_s"] + time.perf_counter() - t
    test_set = load_task(cfg.data.dataset, "test", image_size=size)  # read once, at the end
    test_acc = accuracy(model, test_set, preprocess, device, cfg.data.eval_batch_size,
                        cfg.train.precision)
    write_best()
    if cfg.save_checkpoints:
        save_weights(out_dir / "final.safetensors", trainable_state(model, "cpu"),
                      {**meta, "step": str(step)})
    save_weights(out_dir / "attention.safetensors",
                  {"pretrained": state["base_attn"], "final": final_attn[:ATTENTION_SAMPLES],
                   "labels": val_set.labels[probe_idx][:ATTENTION_SAMPLES],
                   "images": probe_images[:ATTENTION_SAMPLES]}, meta)

    base = record["baseline"]
    record["final"] = {
        "step": step, "epochs": step / steps_per_epoch,
        "val_acc": history["epochs"][-1]["val_acc"] if history["epochs"] else None,
        "best_val_acc": state["best_val"], "best_epoch": state["best_epoch"],
        "test_acc": test_acc,
        "train_loss": history["loss"][-1]["loss"] if history["loss"] else None,
        "metrics": final_metrics,
        "delta_pct": {m: delta_pct(final_metrics["mean"][m], base["mean"][m]) for m in METRICS},
        "delta_pct_layers": {
            m: [delta_pct(a, b) for a, b in zip(final_metrics[m]["layers"],
                                                 base[m]["layers"], strict=True)]
            for m in METRICS},
        "subsets": final_subsets,
        # the study's reporting: drift averaged over the fixed probe subsets
        "delta_pct_subset_mean": {m: sum(delta_pct(f[m], b[m]) for f, b in zip(
            final_subsets, base["subsets"], strict=True)) / len(final_subsets) for m in METRICS},
        # auxiliary analyses, and how much the core metrics depend on which probe subset is
        # used (coefficient of variation over the fixed subsets)
        "aux": {**final_aux, "subset_cv": {
            m: coefficient_of_variation([f[m] for f in final_subsets]) for m in METRICS}},
    }
    record["zeroshot"] = {
        name: {"before": zs_before[name], "after": zs_after[name],
               "retention_pct": 100.0 * zs_after[name] / zs_before[name]
               if zs_before[name] > 0 else None,
               "chance": 1.0 / task.num_classes, "classes": task.num_classes}
        for name, task in zs_tasks.items()}
    train_s = state["train_s"]
    if board is not None:
        board_metrics(board, final_metrics, base, step)
        for name, z in record["zeroshot"].items():
            board.add_scalar(f"zeroshot/{name}", z["after"], step)
        board.add_scalar("test/accuracy", test_acc, step)
        board.close()
    timing.update({"train_s": train_s, "probe_s": state["probe_s"], "zeroshot_s": zeroshot_s,
                   "aux_s": aux_s,
                   "steps": step, "probes": len(history["probes"]) + 1,
                   "train_images_per_s": step * bs / train_s if train_s > 0 else None})
