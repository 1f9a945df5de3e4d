"""The benchmark's pieces that run the library's own code paths: models, training steps, probes,
the other pieces of a run, several runs on one GPU, and the projected wall time of the real
studies from those pieces (benchmarks/run.py prints them)."""

from __future__ import annotations

import copy
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# The real setting (the study; tanganke/eurosat, timm/oxford-iiit-pet, uoft-cs/cifar100).
DATASET_SIZES = {"eurosat": {"train": 21_600, "test": 2_700, "side": 64},
                 "pets": {"train": 3_680, "test": 3_669, "side": 224},
                 "cifar100": {"train": 50_000, "test": 10_000, "side": 32}}
NUM_CLASSES = 10
PROBE_SHAPE = (200, 12, 12, 49)  # images x layers x heads x patches of a ViT-B/32 probe
STUDY_EVAL_BATCH = 32  # "Structural evaluation uses batch size 32" (002, section 3)
VIT_B32 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "patch_size": 32, "image_size": 224}
GFLOP_FWD_VIT_B32 = 8.8  # per 224x224 image forward (issue 7)
GFLOP_TRAIN = {"full_ft": 3 * GFLOP_FWD_VIT_B32,  # forward + backward (activations, weights)
               "lora": 2 * GFLOP_FWD_VIT_B32}  # no weight gradients for the frozen base


REPO = Path(__file__).resolve().parents[1]


def _rate(v: float) -> str:
    return f"{v:,.0f} img/s" if v >= 100 else f"{v:.2f} img/s"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], repeat: int, device: torch.device | None = None,
            warmup: int = 1) -> dict[str, float]:
    """Best and median seconds of ``repeat`` calls (after ``warmup`` untimed ones)."""
    device = device or torch.device("cpu")
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"best_s": min(times), "median_s": statistics.median(times), "repeat": repeat}


# The metrics the study computed, and so the naive per-batch reference: a metric attndrift adds
# (attndrift.signals) is not in the comparison.
STUDY_METRICS = ("entropy", "erf", "gini", "head_diversity")


def _flatten(table: dict[str, Any]) -> list[float]:
    values: list[float] = []
    for m in ("entropy", "erf", "gini"):
        values += table[m]["layers"] + [v for row in table[m]["heads"] for v in row]
    return values + table["head_diversity"]["layers"] + [table["mean"][k]
                                                         for k in sorted(STUDY_METRICS)]


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference over every number of two ``summarize`` tables."""
    return max(abs(x - y) for x, y in zip(_flatten(a), _flatten(b), strict=True))


def build_clip(kind: str):
    """``(CLIPModel, Preprocessor)``: the shipped tiny CLIP, or ViT-B/32 shapes at random (a
    tiny text tower: only the vision tower and projection matter here)."""
    from transformers import CLIPConfig, CLIPModel

    from attndrift.data.base import Preprocessor
    from attndrift.models.clip import OPENAI_MEAN, OPENAI_STD, load_clip

    if kind == "tiny":
        loaded = load_clip("tiny")
        return loaded.model, loaded.preprocessor()
    text = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config = CLIPConfig(text_config=text, vision_config=VIT_B32, projection_dim=512)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return CLIPModel(config).eval(), Preprocessor(VIT_B32["image_size"], OPENAI_MEAN, OPENAI_STD)


def eurosat_like(n: int, side: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 ``[n, 3, side, side]`` smooth random images (EuroSAT is 64x64 RGB)."""
    gen = torch.Generator().manual_seed(seed)
    fine = F.interpolate(torch.rand(n, 3, 8, 8, generator=gen), size=(side, side),
                         mode="bicubic", align_corners=False)
    noise = 0.05 * torch.randn(n, 3, side, side, generator=gen)
    return ((fine + noise).clamp(0, 1) * 255).round().to(torch.uint8)


class Trainer:
    """One optimiser step as ``train.py`` takes it: uint8 batch from the host cache, device-side
    preprocessing with random flips, autocast forward, cross-entropy, backward, clip to norm
    1.0, AdamW, warmup/cosine; the loss is accumulated on the device."""

    def __init__(self, clip, method: str, preprocess, device, args, n_images: int = 1024):
        from attndrift.models.adapt import adapt
        from attndrift.models.classifier import CLIPClassifier
        from attndrift.train import warmup_cosine

        torch.manual_seed(0)
        model = CLIPClassifier.from_clip(copy.deepcopy(clip), NUM_CLASSES).to(device)
        kwargs = ({"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
                  if method == "lora" else {})
        self.model = adapt(model, method, **kwargs).model.to(device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_cosine(10_000, 0.05))
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.preprocess, self.device, self.batch = preprocess, device, args.batch
        self.precision = args.precision
        self.images = eurosat_like(n_images)
        self.labels = torch.randint(0, NUM_CLASSES, (n_images,),
                                    generator=torch.Generator().manual_seed(1))
        self.order, self.flips = (torch.Generator().manual_seed(s) for s in (2, 3))
        self.loss_sum = torch.zeros((), device=device)

    def step(self) -> None:
        from attndrift.evaluate import autocast

        idx = torch.randint(0, self.images.shape[0], (self.batch,), generator=self.order)
        x = self.preprocess(self.images[idx].to(self.device, non_blocking=True),
                            flip_mask=self.preprocess.draw_flips(self.batch, self.flips))
        y = self.labels[idx].to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            loss = F.cross_entropy(self.forward(x).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.loss_sum += loss.detach()


def host_sync(trainer: Trainer, steps: int = 3) -> str:
    """``steps`` steps under CUDA's sync debug mode "error": 'none' or the error."""
    if trainer.device.type != "cuda":
        return "n/a (cpu)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            trainer.step()
        return "none"
    except RuntimeError as err:
        return f"sync found: {str(err).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def steps_between_probes(batch: int = 64, per_epoch: int = 5) -> float:
    """Training steps between two probes in the EuroSAT runs (val_frac held out, the ragged
    batch dropped, ``per_epoch`` probes per epoch)."""
    from attndrift.config import RunConfig

    train = DATASET_SIZES["eurosat"]["train"]
    return ((train - round(RunConfig().data.val_frac * train)) // batch) / per_epoch


def bench_model(args, device: torch.device) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Training throughput, probe cost and (for the projection) the other per-run pieces."""
    from attndrift.evaluate import probe_attention
    from attndrift.probes.metrics import summarize

    clip, preprocess = build_clip(args.model)
    rows, pieces, trainers = [], {}, {}
    for method in ("full_ft", "lora"):
        trainer = trainers[method] = Trainer(clip, method, preprocess, device, args)
        for _ in range(args.warmup_steps):
            trainer.step()
        t = measure(lambda tr=trainer: [tr.step() for _ in range(args.block)],
                    args.steps // args.block, device, warmup=0)  # one sync per block
        step_s = t["best_s"] / args.block
        pieces[f"step_s_{method}"] = step_s * 64 / args.batch  # per batch of 64
        sync_note = host_sync(trainer)
        rows.append({"row": f"train {method}", "method": method, "batch": args.batch,
                     "precision": args.precision, "compile": args.compile,
                     "step_ms": 1e3 * step_s, "step_median_ms": 1e3 * t["median_s"] / args.block,
                     "images_per_s": args.batch / step_s, "host_sync_in_step": sync_note,
                     "cells": (f"train {method}", _rate(args.batch / step_s),
                               f"step {1e3 * step_s:.1f} ms", "", f"batch {args.batch}, "
                               f"{args.precision}, host sync: {sync_note}")})
    model, images = trainers["full_ft"].model, eurosat_like(args.probe_images, seed=5)
    held = {}

    def probe() -> None:  # what train.py does at a probe point, at probe.precision
        held["attn"] = probe_attention(model, images, preprocess, device, args.probe_batch,
                                       args.probe_precision, on_device=True)
        summarize(held["attn"])

    probe_s = measure(probe, args.probe_repeat, device, args.io_warmup)["best_s"]
    probe_s *= 200 / args.probe_images  # probes are 200 images; fewer may be timed
    summarize_ms = 1e3 * measure(lambda: summarize(held["attn"]), 5)["best_s"]
    fidelity = None
    if args.probe_precision == "bf16":  # what the faster probe changes in the metrics
        reference = probe_attention(model, images, preprocess, device, args.probe_batch)
        fidelity = max_abs_diff(summarize(reference), summarize(held["attn"]))
    model.train()
    between = steps_between_probes()
    overhead = 100.0 * probe_s / (between * pieces["step_s_full_ft"])
    pieces.update(probe_s=probe_s, steps_between_probes=between)
    note = f"summarize {summarize_ms:.1f} ms, {args.probe_precision}"
    rows.append({"row": "probe overhead", "probe_s": probe_s, "summarize_ms": summarize_ms,
                 "probe_precision": args.probe_precision, "steps_between_probes": between,
                 "step_s_batch64": pieces["step_s_full_ft"], "overhead_pct": overhead,
                 "max_abs_diff_vs_fp32_probe": fidelity,
                 "cells": ("probe overhead", f"{overhead:.2f} % of steps",
                           f"probe {probe_s:.3f} s / {between:.0f} steps x "
                           f"{pieces['step_s_full_ft']:.3f} s", "", note + (
                               f", max |diff| vs fp32 {fidelity:.1e}" if fidelity else ""))})
    if args.project:
        pieces.update(bench_run_pieces(args, clip, trainers, preprocess, device))
    return rows, pieces


def bench_run_pieces(args, clip, trainers, preprocess, device) -> dict[str, float]:
    """The non-training pieces of one run through the library's functions: evaluation and
    zero-shot forward rates, auxiliary metrics, checkpoint writes, model start-up."""
    from safetensors.torch import save
    from transformers import CLIPModel

    from attndrift.data.base import ImageTask
    from attndrift.evaluate import accuracy, auxiliary_metrics, zeroshot_all
    from attndrift.models.classifier import trainable_state
    from attndrift.probes.drift import vision_weight_snapshot
    from attndrift.records import atomic_write_bytes

    model, n, out = trainers["full_ft"].model, args.eval_images, {}
    task = ImageTask("bench", eurosat_like(n, seed=7), torch.zeros(n, dtype=torch.long),
                     [f"c{i}" for i in range(NUM_CLASSES)])
    t = measure(lambda: accuracy(model, task, preprocess, device, args.eval_batch,
                                 args.precision), 2, device)
    out["eval_images_per_s"] = n / t["best_s"]
    width = clip.config.projection_dim  # 512 for ViT-B/32, 64 for the tiny CLIP
    text = {"bench": F.normalize(torch.randn(NUM_CLASSES, width), dim=-1).to(device)}
    t = measure(lambda: zeroshot_all(model, text, {"bench": task}, preprocess, device,
                                     args.eval_batch, args.precision), 2, device)
    out["zeroshot_images_per_s"] = n / t["best_s"]
    images, which = eurosat_like(args.probe_images, seed=5), ["rollout", "cka", "drift"]
    weights = vision_weight_snapshot(model)
    _, ref = auxiliary_metrics(model, images, preprocess, device, args.probe_batch, which,
                               precision=args.probe_precision)
    t = measure(lambda: auxiliary_metrics(model, images, preprocess, device, args.probe_batch,
                                          which, ref, weights, args.probe_precision),
                1, device, warmup=0)
    out["aux_s"] = t["best_s"] * 200 / args.probe_images
    with tempfile.TemporaryDirectory() as tmp:
        for method, tr in trainers.items():
            def checkpoint(tr=tr) -> None:
                state, buffer = trainable_state(tr.model), io.BytesIO()
                torch.save({"model": state, "optimizer": tr.optimizer.state_dict()}, buffer)
                atomic_write_bytes(Path(tmp) / "resume.pt", buffer.getvalue())
                atomic_write_bytes(Path(tmp) / "best.safetensors",
                                   save({k: v.cpu().contiguous() for k, v in state.items()}))
            out[f"checkpoint_s_{method}"] = measure(checkpoint, args.io_repeat,
                                                    warmup=args.io_warmup)["best_s"]
        clip.save_pretrained(tmp)
        out["model_load_s"] = measure(
            lambda: CLIPModel.from_pretrained(tmp, dtype=torch.float32).to(device),
            args.io_repeat, device, warmup=args.io_warmup)["best_s"]
    return out


# --- several runs on one GPU, and the projected study wall time ----------------------------

def worker(args) -> None:
    """One of ``--concurrent`` processes: warm up, wait for the common start, train for
    ``--seconds``, print images/s as one JSON line."""
    device = torch.device(args.device)
    clip, preprocess = build_clip(args.model)
    trainer = Trainer(clip, args.worker, preprocess, device, args)
    for _ in range(args.warmup_steps):
        trainer.step()
    sync(device)
    time.sleep(max(0.0, args.start_at - time.time()))
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        trainer.step()
        steps += 1
        if steps % 10 == 0:
            sync(device)
    sync(device)
    print(json.dumps({"images": steps * args.batch, "seconds": time.perf_counter() - start}))


def bench_concurrent(args, method: str = "full_ft") -> dict[str, Any]:
    """Aggregate training images/s of ``args.concurrent`` processes sharing the device."""
    start_at = time.time() + args.concurrent_startup
    cmd = [sys.executable, str(REPO / "benchmarks" / "run.py"), "--worker", method,
           "--model", args.model, "--device", args.device, "--batch", str(args.batch),
           "--precision", args.precision,
           "--warmup-steps", str(args.warmup_steps), "--seconds", str(args.seconds),
           "--start-at", str(start_at)] + (["--compile"] if args.compile else [])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
             for _ in range(args.concurrent)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    total = sum(r["images"] / r["seconds"] for r in results)
    return {"row": f"concurrent {method}", "processes": args.concurrent,
            "images_per_s": total, "per_process": [r["images"] / r["seconds"] for r in results],
            "cells": (f"concurrent {method}", _rate(total), f"{args.concurrent} processes", "",
                      "")}


def checkpoints(epochs: int, epoch_s: float, minutes: float) -> int:
    """Resume checkpoints a run writes under ``train.checkpoint_minutes`` (train.py's rule: at
    the first epoch end at least ``minutes`` after the last checkpoint, never after the last
    epoch) when each epoch takes ``epoch_s`` seconds."""
    count, since = 0, 0.0
    for _ in range(epochs - 1):
        since += epoch_s
        if since >= 60 * minutes:
            count, since = count + 1, 0.0
    return count


def project_study(path: Path, pieces: dict[str, float], concurrency_gain: float = 1.0
                  ) -> dict[str, Any]:
    """Projected wall time of a study on this device from per-run pieces measured here.

    Per run: model load + probes (5 subsets before and after, and every training probe) +
    auxiliary metrics (before and after) + training steps (full FT step for full_ft, freeze
    and the regularisers, LoRA step for lora) + evaluation forwards (validation accuracy every
    epoch and test once at the accuracy rate; zero-shot on CIFAR-100 before and after and
    own-task zero-shot at the zero-shot rate) + resume checkpoints as
    ``train.checkpoint_minutes`` spaces them (``checkpoints``) + the APR reference cache (two
    probe passes over the training images). Runs one after another, divided by
    ``concurrency_gain`` (aggregate throughput of several runs on the device over one run's).
    """
    from attndrift.study.spec import load_study
    from attndrift.train import probe_steps

    _, planned = load_study(path)
    total = 0.0
    for run in planned:
        cfg = run.config
        sizes = DATASET_SIZES[cfg.data.dataset]
        val = round(cfg.data.val_frac * sizes["train"])
        train = sizes["train"] - val
        bs = cfg.train.batch_size
        per_epoch = train // bs
        steps = per_epoch * cfg.train.epochs
        if cfg.train.max_steps is not None:
            steps = min(steps, cfg.train.max_steps)
        probes = len(probe_steps(per_epoch, steps, cfg.probe.per_epoch)) + 2 * cfg.probe.subsets
        method = "lora" if cfg.method == "lora" else "full_ft"
        zeroshot_images = 2 * sum(DATASET_SIZES[z]["test"] for z in cfg.data.zeroshot) + val
        eval_images = cfg.train.epochs * val + sizes["test"]  # validation every epoch, test
        epoch_s = (per_epoch * pieces[f"step_s_{method}"] * bs / 64
                   + val / pieces["eval_images_per_s"])
        t = (pieces["model_load_s"] + probes * pieces["probe_s"] + 2 * pieces["aux_s"]
             + steps * pieces[f"step_s_{method}"] * bs / 64
             + eval_images / pieces["eval_images_per_s"]
             + zeroshot_images / pieces["zeroshot_images_per_s"]
             + checkpoints(cfg.train.epochs, epoch_s, cfg.train.checkpoint_minutes)
             * pieces[f"checkpoint_s_{method}"])
        if cfg.regularizer.name == "apr":
            t += 2 * train / 200 * pieces["probe_s"]
        total += t
    return {"study": path.stem, "runs": len(planned), "serial_s": total,
            "concurrency_gain": concurrency_gain, "wall_s": total / concurrency_gain}


def flop_pieces(bf16_tflops: float, fp32_tflops: float) -> dict[str, float]:
    """Per-run pieces for ``project_study`` from FLOP counts at assumed sustained rates: an
    estimate, not a measurement (checkpoints and model load count as free)."""
    fwd = GFLOP_FWD_VIT_B32 * 1e9
    return {"step_s_full_ft": 64 * GFLOP_TRAIN["full_ft"] * 1e9 / (bf16_tflops * 1e12),
            "step_s_lora": 64 * GFLOP_TRAIN["lora"] * 1e9 / (bf16_tflops * 1e12),
            "probe_s": 200 * fwd / (fp32_tflops * 1e12),
            "aux_s": 3 * 200 * fwd / (fp32_tflops * 1e12),  # rollout, CKA, embeddings
            "eval_images_per_s": bf16_tflops * 1e12 / fwd,
            "zeroshot_images_per_s": bf16_tflops * 1e12 / fwd,  # train.precision, as accuracy
            "checkpoint_s_full_ft": 0.0, "checkpoint_s_lora": 0.0, "model_load_s": 0.0}


