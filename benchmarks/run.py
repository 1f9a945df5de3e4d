"""attndrift's performance table: metrics, probe overhead, training and input throughput.

    python benchmarks/run.py --quick                  # < 1 min on 2 CPU cores (shipped tiny CLIP)
    python benchmarks/run.py --model vit-b32          # ViT-B/32 shapes, random weights
    python benchmarks/run.py --device cuda --model vit-b32 --compile --concurrent 2 --json out.json

Every row is measured in this one process, side by side, on identical inputs; timings are the
best of several repeats (the median is kept in the JSON too), because the best is what the code
costs and the rest is other processes on the machine. Rows:

- metrics: ``attndrift.probes.metrics.summarize`` against ``naive_summarize``, the study's
  per-batch pattern, on the same ``[200, 12, 12, 49]`` CLS->patch tensor (a ViT-B/32 probe);
- probe overhead: one training-time probe (``evaluate.probe_attention`` + ``summarize`` on 200
  images) as a percentage of the training time between two probes (EuroSAT, batch 64, 5 probes
  per epoch);
- training throughput (images/s) of full fine-tuning and LoRA, step exactly as ``train.py``;
- input pipeline: the uint8 cache + ``Preprocessor`` on the device against per-image PIL decode
  and resize, plus the once-per-dataset ``data.cache.decode_all``;
- with ``--model vit-b32``: a projected wall time of the ``matched_lr80`` and ``paper21``
  studies from the measured per-run pieces (``project_study``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
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

REPO = Path(__file__).resolve().parents[1]

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


# ------------------------------------------------------------------------------------------
# Timing and environment
# ------------------------------------------------------------------------------------------


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


def environment(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import numpy
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "numpy": numpy.__version__,
           "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
           "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# ------------------------------------------------------------------------------------------
# Metrics: attndrift's summarize vs the study's per-batch pattern
# ------------------------------------------------------------------------------------------


def random_probe(shape: tuple[int, int, int, int] = PROBE_SHAPE, seed: int = 0) -> torch.Tensor:
    """CLS->patch maps ``[n, L, H, N]`` (float32) with a pretrained ViT-B/32's spread.

    Softmax of random logits plus a fixed per-(layer, head) pattern, sharper in later layers:
    layer-mean entropy ~3.65 nats, ERF ~0.84, Gini ~0.34 (the study's pretrained ViT-B/32:
    ERF 0.862, Gini 0.309, entropy 3.6-3.8).
    """
    _, n_layers, n_heads, n_patches = shape
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 1.0, n_layers).view(1, n_layers, 1, 1)
    scale = scale * (0.75 + 0.5 * torch.rand(1, 1, n_heads, 1, generator=gen))
    pattern = torch.randn(1, n_layers, n_heads, n_patches, generator=gen)
    logits = torch.randn(shape, generator=gen) + 0.5 * pattern
    return (logits * scale).softmax(dim=-1)


def naive_summarize(cls_patch: torch.Tensor, batch_size: int = STUDY_EVAL_BATCH,
                    mass: float = 0.95) -> dict[str, Any]:
    """The study's per-batch pattern, computing the same table as ``summarize``.

    For each batch of ``batch_size`` images and each layer: entropy, a descending sort +
    cumulative sum for ERF, an ascending sort for Gini, per-head sums kept on the side and
    per-layer sums read back with ``.item()``; head diversity afterwards from the image-averaged
    maps with a Python loop over head pairs and ``.item()``. ERF uses the library's relative
    tolerance (``ERF_RTOL``) so both sides define the boundary identically.
    """
    from attndrift.probes.metrics import ERF_RTOL

    n, n_layers, n_heads, n_patches = cls_patch.shape
    names = ("entropy", "erf", "gini")
    layer_sums = {m: [0.0] * n_layers for m in names}
    head_sums = {m: [torch.zeros(n_heads, dtype=torch.float64) for _ in range(n_layers)]
                 for m in names}
    map_sums = [torch.zeros(n_heads, n_patches, dtype=torch.float64) for _ in range(n_layers)]
    ranks = torch.arange(1, n_patches + 1, dtype=cls_patch.dtype)
    for start in range(0, n, batch_size):
        batch = cls_patch[start : start + batch_size]
        for layer in range(n_layers):
            p = batch[:, layer]  # [B, H, N]
            values = {"entropy": -(p * torch.log(p + 1e-10)).sum(dim=-1)}
            desc = torch.sort(p, dim=-1, descending=True).values
            cum = desc.cumsum(dim=-1)
            k = (cum < mass * cum[..., -1:] * (1.0 - ERF_RTOL)).sum(dim=-1) + 1
            values["erf"] = k.clamp(max=n_patches).float() / n_patches
            asc = torch.sort(p, dim=-1).values
            values["gini"] = (2.0 * (asc * ranks).sum(dim=-1) / (n_patches * asc.sum(dim=-1))
                              - (n_patches + 1) / n_patches)
            for m in names:
                layer_sums[m][layer] += values[m].double().sum().item()
                head_sums[m][layer] += values[m].double().sum(dim=0)
            map_sums[layer] += p.double().sum(dim=0)
    out: dict[str, Any] = {"mean": {}}
    for m in names:
        layers = [s / (n * n_heads) for s in layer_sums[m]]
        out[m] = {"layers": layers, "heads": [(h / n).tolist() for h in head_sums[m]]}
        out["mean"][m] = sum(layers) / n_layers
    diversity = []
    for layer in range(n_layers):
        maps = (map_sums[layer] / n).float()
        cosines = [F.cosine_similarity(maps[i], maps[j], dim=0).item()
                   for i in range(n_heads) for j in range(i + 1, n_heads)]
        diversity.append(1.0 - sum(cosines) / len(cosines))
    out["head_diversity"] = {"layers": diversity}
    out["mean"]["head_diversity"] = sum(diversity) / n_layers
    return out


def _flatten(table: dict[str, Any]) -> list[float]:
    values: list[float] = []
    for m in ("entropy", "erf", "gini"):
        values += table[m]["layers"] + [v for row in table[m]["heads"] for v in row]
    values += table["head_diversity"]["layers"] + [table["mean"][k] for k in sorted(table["mean"])]
    return values


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference over every number of two ``summarize`` tables."""
    return max(abs(x - y) for x, y in zip(_flatten(a), _flatten(b), strict=True))


def bench_metrics(repeat: int, naive_repeat: int, shape=PROBE_SHAPE, rounds: int = 4
                  ) -> dict[str, Any]:
    from attndrift.probes.metrics import summarize

    x = random_probe(shape)
    diff = max_abs_diff(summarize(x), naive_summarize(x))
    # Alternating blocks, so that both sides meet the same moments of the machine's load.
    fast_times, slow_times = [], []
    for _ in range(rounds):
        fast_times.append(measure(lambda: summarize(x), max(1, repeat // rounds)))
        slow_times.append(measure(lambda: naive_summarize(x), max(1, naive_repeat // rounds)))
    fast_s = min(t["best_s"] for t in fast_times)
    slow_s = min(t["best_s"] for t in slow_times)
    n = shape[0]
    return {"row": "metrics", "shape": list(shape), "naive_batch": STUDY_EVAL_BATCH,
            "rounds": rounds, "attndrift_ms": 1e3 * fast_s,
            "attndrift_median_ms": 1e3 * statistics.median(t["median_s"] for t in fast_times),
            "naive_ms": 1e3 * slow_s,
            "naive_median_ms": 1e3 * statistics.median(t["median_s"] for t in slow_times),
            "attndrift_images_per_s": n / fast_s, "naive_images_per_s": n / slow_s,
            "speedup": slow_s / fast_s, "max_abs_diff": diff}


# ------------------------------------------------------------------------------------------
# Models, training steps and probes (the real library code paths)
# ------------------------------------------------------------------------------------------


def build_clip(kind: str):
    """``(CLIPModel, Preprocessor)``: the shipped tiny CLIP, or ViT-B/32 shapes at random."""
    from attndrift.data.base import Preprocessor
    from attndrift.models.clip import OPENAI_MEAN, OPENAI_STD, load_clip

    if kind == "tiny":
        loaded = load_clip("tiny")
        return loaded.model, loaded.preprocessor()
    from transformers import CLIPConfig, CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # Only the vision tower and projection matter here; the text tower is kept tiny.
    text = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    config = CLIPConfig(text_config=text, vision_config=VIT_B32, projection_dim=512)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    return model, Preprocessor(VIT_B32["image_size"], OPENAI_MEAN, OPENAI_STD)


def eurosat_like(n: int, side: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 ``[n, 3, side, side]`` smooth random images (EuroSAT is 64x64 RGB)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=gen)
    fine = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    noise = 0.05 * torch.randn(n, 3, side, side, generator=gen)
    return ((fine + noise).clamp(0, 1) * 255).round().to(torch.uint8)


def make_classifier(clip, method: str, device: torch.device):
    from attndrift.models.adapt import adapt
    from attndrift.models.classifier import CLIPClassifier

    torch.manual_seed(0)
    model = CLIPClassifier.from_clip(copy.deepcopy(clip), NUM_CLASSES).to(device)
    kwargs = ({"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
              if method == "lora" else {})
    adapted = adapt(model, method, **kwargs)
    return adapted.model.to(device)


class Trainer:
    """One optimiser step exactly as ``train.py`` takes it: uint8 batch from the host cache,
    device-side preprocessing with random flips, autocast forward, cross-entropy, backward,
    clip to norm 1.0, AdamW, warmup/cosine schedule; the loss is accumulated on the device."""

    def __init__(self, clip, method: str, preprocess, device: torch.device, batch: int,
                 precision: str, compile_model: bool, n_images: int = 1024) -> None:
        from attndrift.train import warmup_cosine

        self.model = make_classifier(clip, method, device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_cosine(10_000, 0.05))
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.preprocess, self.device, self.batch, self.precision = (preprocess, device, batch,
                                                                    precision)
        self.images = eurosat_like(n_images)
        self.labels = torch.randint(0, NUM_CLASSES, (n_images,),
                                    generator=torch.Generator().manual_seed(1))
        self.order = torch.Generator().manual_seed(2)
        self.flips = torch.Generator().manual_seed(3)
        self.loss_sum = torch.zeros((), device=device)

    def step(self) -> None:
        from attndrift.evaluate import autocast

        idx = torch.randint(0, self.images.shape[0], (self.batch,), generator=self.order)
        flips = self.preprocess.draw_flips(self.batch, self.flips)
        x = self.preprocess(self.images[idx].to(self.device, non_blocking=True),
                            flip_mask=flips)
        y = self.labels[idx].to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            loss = F.cross_entropy(self.forward(x).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.loss_sum += loss.detach()


def check_no_host_sync(trainer: Trainer, steps: int = 3) -> str:
    """Run ``steps`` steps with CUDA's sync debug mode set to error: 'none' or the error."""
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
    """Training steps between two probes in the EuroSAT runs: attndrift holds out val_frac of
    the train split (stratified), drops the ragged batch and probes ``per_epoch`` times."""
    from attndrift.config import RunConfig

    cfg = RunConfig()
    train = DATASET_SIZES["eurosat"]["train"]
    train_kept = train - round(cfg.data.val_frac * train)
    return (train_kept // batch) / per_epoch


def bench_model(args, device: torch.device) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Training throughput, probe cost and (for the projection) evaluation pieces."""
    from attndrift.evaluate import probe_attention
    from attndrift.probes.metrics import summarize

    clip, preprocess = build_clip(args.model)
    rows, pieces = [], {}
    trainers = {}
    for method in ("full_ft", "lora"):
        trainer = Trainer(clip, method, preprocess, device, args.batch, args.precision,
                          args.compile)
        for _ in range(args.warmup_steps):
            trainer.step()

        def block(trainer=trainer) -> None:  # consecutive steps, one sync at the end
            for _ in range(args.block):
                trainer.step()

        timing = measure(block, args.steps // args.block, device, warmup=0)
        step_s, step_median_s = timing["best_s"] / args.block, timing["median_s"] / args.block
        trainers[method] = trainer
        pieces[f"step_s_{method}"] = step_s * 64 / args.batch  # per batch of 64
        rows.append({"row": f"train {method}", "method": method, "batch": args.batch,
                     "precision": args.precision, "compile": args.compile,
                     "steps_timed": args.steps, "steps_per_block": args.block,
                     "step_ms": 1e3 * step_s, "step_median_ms": 1e3 * step_median_s,
                     "images_per_s": args.batch / step_s,
                     "host_sync_in_step": check_no_host_sync(trainer)})

    model = trainers["full_ft"].model
    probe_images = eurosat_like(args.probe_images, seed=5)
    per_200 = 200 / args.probe_images  # probes are 200 images; fewer are timed and scaled
    attn_holder = {}

    def probe() -> None:  # what train.py does at a probe point, at probe.precision
        attn_holder["attn"] = probe_attention(model, probe_images, preprocess, device,
                                              args.probe_batch, args.probe_precision,
                                              on_device=True)
        summarize(attn_holder["attn"])

    probe_t = measure(probe, args.probe_repeat, device, warmup=args.io_warmup)
    summarize_t = measure(lambda: summarize(attn_holder["attn"]), 5)
    fidelity = None
    if args.probe_precision == "bf16":  # what the faster probe changes in the metrics
        reference = summarize(probe_attention(model, probe_images, preprocess, device,
                                              args.probe_batch))
        fidelity = max_abs_diff(reference, summarize(attn_holder["attn"]))
    model.train()
    probe_s = probe_t["best_s"] * per_200
    between = steps_between_probes()
    overhead = 100.0 * probe_s / (between * pieces["step_s_full_ft"])
    pieces.update({"probe_s": probe_s, "steps_between_probes": between})
    rows.append({"row": "probe overhead", "probe_images": 200,
                 "probe_images_timed": args.probe_images, "probe_batch": args.probe_batch,
                 "probe_precision": args.probe_precision, "probe_s": probe_s,
                 "summarize_ms": 1e3 * summarize_t["best_s"],
                 "steps_between_probes": between, "step_s_batch64": pieces["step_s_full_ft"],
                 "step_scaled_from_batch": args.batch, "overhead_pct": overhead,
                 "max_abs_diff_vs_fp32_probe": fidelity})
    if args.project:
        pieces.update(bench_run_pieces(args, clip, trainers, preprocess, device))
    return rows, pieces


def bench_run_pieces(args, clip, trainers, preprocess, device) -> dict[str, float]:
    """The non-training pieces of one run: evaluation forward rate, auxiliary metrics,
    checkpoint writes and model start-up, each through the library's own functions."""
    from safetensors.torch import save

    from attndrift.data.base import ImageTask
    from attndrift.evaluate import accuracy, auxiliary_metrics, zeroshot_all
    from attndrift.models.classifier import trainable_state
    from attndrift.probes.drift import vision_weight_snapshot
    from attndrift.records import atomic_write_bytes

    out: dict[str, float] = {}
    model = trainers["full_ft"].model
    n_eval = args.eval_images
    task = ImageTask("bench", eurosat_like(n_eval, seed=7), torch.zeros(n_eval, dtype=torch.long),
                     [f"c{i}" for i in range(NUM_CLASSES)])
    t = measure(lambda: accuracy(model, task, preprocess, device, args.eval_batch,
                                 args.precision), 2, device)
    out["eval_images_per_s"] = n_eval / t["best_s"]
    text = F.normalize(torch.randn(NUM_CLASSES, 512), dim=-1).to(device)  # zero-shot weights
    t = measure(lambda: zeroshot_all(model, {"bench": text}, {"bench": task}, preprocess,
                                     device, args.eval_batch, args.precision), 2, device)
    out["zeroshot_images_per_s"] = n_eval / t["best_s"]
    probe_images = eurosat_like(args.probe_images, seed=5)
    which = ["rollout", "cka", "drift"]
    weights = vision_weight_snapshot(model)
    _, reference = auxiliary_metrics(model, probe_images, preprocess, device, args.probe_batch,
                                     which, precision=args.probe_precision)
    t = measure(lambda: auxiliary_metrics(model, probe_images, preprocess, device,
                                          args.probe_batch, which, reference, weights,
                                          args.probe_precision), 1, device, warmup=0)
    out["aux_s"] = t["best_s"] * 200 / args.probe_images
    with tempfile.TemporaryDirectory() as tmp:
        for method, trainer in trainers.items():
            def checkpoint(trainer=trainer) -> None:
                state = trainable_state(trainer.model)
                buffer = io.BytesIO()
                torch.save({"model": state, "optimizer": trainer.optimizer.state_dict()}, buffer)
                atomic_write_bytes(Path(tmp) / "resume.pt", buffer.getvalue())
                atomic_write_bytes(Path(tmp) / "best.safetensors",
                                   save({k: v.cpu().contiguous() for k, v in state.items()}))
            out[f"checkpoint_s_{method}"] = measure(checkpoint, args.io_repeat,
                                                    warmup=args.io_warmup)["best_s"]
        clip.save_pretrained(tmp)

        def start() -> None:
            from transformers import CLIPModel

            CLIPModel.from_pretrained(tmp, dtype=torch.float32).to(device)

        out["model_load_s"] = measure(start, args.io_repeat, device,
                                      warmup=args.io_warmup)["best_s"]
    return out


# ------------------------------------------------------------------------------------------
# Input pipeline
# ------------------------------------------------------------------------------------------


def encoded_images(images: torch.Tensor, fmt: str = "JPEG") -> list[bytes]:
    from PIL import Image

    out = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buffer, format=fmt, quality=95)
        out.append(buffer.getvalue())
    return out


def pil_batch(blobs: list[bytes], size: int, mean: torch.Tensor, std: torch.Tensor,
              device: torch.device) -> torch.Tensor:
    """The per-image path: PIL decode -> resize short side (bicubic) -> center crop -> tensor ->
    normalise, then stack and move the float batch to the device."""
    import numpy as np
    from PIL import Image

    out = []
    for blob in blobs:
        image = Image.open(io.BytesIO(blob)).convert("RGB")
        scale = size / min(image.width, image.height)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255
        out.append((x - mean) / std)
    return torch.stack(out).to(device)


def bench_input(args, device: torch.device) -> dict[str, Any]:
    from PIL import Image

    from attndrift.data.base import Preprocessor
    from attndrift.data.cache import decode_all
    from attndrift.models.clip import OPENAI_MEAN, OPENAI_STD

    size, batch = 224, 64
    n_pil, n_cache = args.input_images, max(args.input_images, 4 * batch)
    images = eurosat_like(n_cache, seed=9)
    blobs = encoded_images(images[:n_pil])
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    pil = measure(lambda: [pil_batch(blobs[s : s + batch], size, mean, std, device)
                           for s in range(0, n_pil, batch)], 1, device)
    preprocess = Preprocessor(size, OPENAI_MEAN, OPENAI_STD)
    flips = torch.Generator().manual_seed(0)

    def cached(source: torch.Tensor) -> None:
        for s in range(0, n_cache, batch):
            mask = preprocess.draw_flips(min(batch, n_cache - s), flips)
            preprocess(source[s : s + batch].to(device, non_blocking=True), flip_mask=mask)

    cache = measure(lambda: cached(images), args.input_repeat, device)
    row = {"row": "input pipeline", "size": size, "source_side": 64, "batch": batch,
           "pil_images": n_pil, "cache_images": n_cache,
           "pil_images_per_s": n_pil / pil["best_s"],
           "cache_images_per_s": n_cache / cache["best_s"],
           "speedup": (n_cache / cache["best_s"]) / (n_pil / pil["best_s"])}
    if device.type == "cuda":  # the uint8 cache resident on the GPU: no per-step copy
        resident = images.to(device)
        t = measure(lambda: cached(resident), args.input_repeat, device)
        row["cache_on_device_images_per_s"] = n_cache / t["best_s"]
    decode = measure(lambda: decode_all((Image.open(io.BytesIO(b)) for b in blobs), n_pil,
                                        size, "bench", progress=False), 1)
    row["decode_all_images_per_s"] = n_pil / decode["best_s"]
    return row


# ------------------------------------------------------------------------------------------
# Several runs on one GPU, and the projected study wall time
# ------------------------------------------------------------------------------------------


def worker(args) -> None:
    """One of ``--concurrent`` processes: warm up, wait for the common start, train for
    ``--seconds``, print images/s as one JSON line."""
    device = torch.device(args.device)
    clip, preprocess = build_clip(args.model)
    trainer = Trainer(clip, args.worker, preprocess, device, args.batch, args.precision,
                      args.compile)
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
    elapsed = time.perf_counter() - start
    print(json.dumps({"images": steps * args.batch, "seconds": elapsed}))


def bench_concurrent(args, method: str = "full_ft") -> dict[str, Any]:
    """Aggregate training images/s of ``args.concurrent`` processes sharing the device."""
    start_at = time.time() + args.concurrent_startup
    cmd = [sys.executable, __file__, "--worker", method, "--model", args.model, "--device",
           args.device, "--batch", str(args.batch), "--precision", args.precision,
           "--warmup-steps", str(args.warmup_steps), "--seconds", str(args.seconds),
           "--start-at", str(start_at)] + (["--compile"] if args.compile else [])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
             for _ in range(args.concurrent)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    total = sum(r["images"] / r["seconds"] for r in results)
    return {"row": f"concurrent {method}", "processes": args.concurrent,
            "images_per_s": total, "per_process": [r["images"] / r["seconds"] for r in results]}


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
    own-task zero-shot at the zero-shot rate) + resume checkpoints as ``train.checkpoint_minutes``
    spaces them (`checkpoints`) + the APR
    reference cache (two probe passes over the training images). Runs one after another,
    divided by ``concurrency_gain`` (aggregate throughput of several runs on the device over
    one run's).
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


# ------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------


def _fmt_rate(v: float) -> str:
    return f"{v:,.0f} img/s" if v >= 100 else f"{v:.2f} img/s"


def _fmt_duration(seconds: float) -> str:
    for unit, size, limit in (("s", 1, 120), ("min", 60, 120), ("h", 3600, 48)):
        if seconds / size < limit:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds / 86400:.1f} days"


def table_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for r in result["rows"]:
        name = r["row"]
        if name == "metrics":
            cells = (f"metrics {'x'.join(map(str, r['shape']))}",
                     f"{r['attndrift_ms']:.2f} ms", f"naive b{r['naive_batch']} "
                     f"{r['naive_ms']:.1f} ms", f"{r['speedup']:.1f}x",
                     f"max |diff| {r['max_abs_diff']:.1e}, {r.get('kernel', '?')}")
        elif name == "probe overhead":
            fidelity = r.get("max_abs_diff_vs_fp32_probe")
            cells = ("probe overhead", f"{r['overhead_pct']:.2f} % of steps",
                     f"probe {r['probe_s']:.3f} s / {r['steps_between_probes']:.0f} steps x "
                     f"{r['step_s_batch64']:.3f} s", "",
                     f"summarize {r['summarize_ms']:.1f} ms, {r['probe_precision']}"
                     + (f", max |diff| vs fp32 {fidelity:.1e}" if fidelity is not None else ""))
        elif name.startswith("train"):
            cells = (name, _fmt_rate(r["images_per_s"]), f"step {r['step_ms']:.1f} ms",
                     "", f"batch {r['batch']}, {r['precision']}, host sync: "
                     f"{r['host_sync_in_step']}")
        elif name.startswith("concurrent"):
            cells = (name, _fmt_rate(r["images_per_s"]), f"{r['processes']} processes", "", "")
        elif name == "input pipeline":
            extra = ""
            if "cache_on_device_images_per_s" in r:
                extra = f"; resident {_fmt_rate(r['cache_on_device_images_per_s'])}"
            cells = ("input 64px -> 224", _fmt_rate(r["cache_images_per_s"]),
                     f"PIL {_fmt_rate(r['pil_images_per_s'])}", f"{r['speedup']:.1f}x",
                     f"decode_all once {_fmt_rate(r['decode_all_images_per_s'])}{extra}")
        else:
            continue
        lines.append(cells)
    for p in result.get("projection", []):
        lines.append((f"projected {p['study']}", _fmt_duration(p["wall_s"]),
                      f"{p['runs']} runs, one after another {_fmt_duration(p['serial_s'])}", "",
                      f"concurrency gain {p['concurrency_gain']:.2f}"))
    header = ("row", "attndrift", "reference", "ratio", "notes")
    widths = [max(len(str(c[i])) for c in [header, *lines]) for i in range(5)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*c) for c in lines]


# ------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small repeats; < 1 min on 2 CPU cores")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    p.add_argument("--model", choices=["tiny", "vit-b32"], default=None,
                   help="tiny (shipped, default with --quick) or vit-b32 (random weights)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--rows", default="metrics,model,input",
                   help="comma list of metrics, model (train + probe), input")
    p.add_argument("--batch", type=int, help="training batch (default 64; 8 for vit-b32 on CPU)")
    p.add_argument("--steps", type=int, help="timed training steps per method")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="training autocast as in train.train.precision (auto: bf16 on CUDA)")
    p.add_argument("--probe-precision", choices=["fp32", "bf16"], default="fp32",
                   help="probe.precision of the probes and auxiliary metrics (bf16: autocast)")
    p.add_argument("--probe-batch", type=int, default=64, help="probe.batch_size")
    p.add_argument("--compile", action="store_true", help="torch.compile the training model")
    p.add_argument("--concurrent", type=int, default=0,
                   help="also train this many processes at once on the device (aggregate)")
    p.add_argument("--seconds", type=float, default=30.0, help="timed window per worker")
    p.add_argument("--concurrent-startup", type=float, default=90.0,
                   help="seconds the workers get to load and warm up before the common start")
    p.add_argument("--no-project", dest="project", action="store_false",
                   help="skip the study projection (on by default with vit-b32)")
    p.add_argument("--flop-estimate", metavar="BF16,FP32",
                   help="only print the studies' projected wall time from FLOP counts at these "
                        "sustained TFLOP/s (an estimate, nothing is measured), e.g. 320,50")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = args.device == "cpu"
    args.model = args.model or ("tiny" if args.quick or cpu else "vit-b32")
    big_on_cpu = cpu and args.model == "vit-b32"
    args.batch = args.batch or (8 if big_on_cpu else 64)
    args.steps = args.steps or (3 if big_on_cpu else 10 if args.quick else 30)
    args.block = 1 if big_on_cpu else 5 if cpu else 10  # steps timed together
    args.block = min(args.block, args.steps)
    args.metric_repeat, args.naive_repeat = (80, 8) if args.quick else (200, 20)
    args.probe_repeat = 1 if big_on_cpu else 3
    args.probe_images = 32 if big_on_cpu else 200  # timed; scaled to the real 200
    args.io_repeat, args.io_warmup = (1, 0) if big_on_cpu else (2, 1)
    args.input_images = 128 if args.quick else 512
    args.input_repeat = 2 if args.quick else 5
    args.eval_images = 16 if big_on_cpu else 512
    args.eval_batch = 16 if big_on_cpu else 256
    args.project = args.project and args.model == "vit-b32"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return {}
    if args.flop_estimate:
        bf16, fp32 = (float(v) for v in args.flop_estimate.split(","))
        result = {"flop_estimate": {"bf16_tflops": bf16, "fp32_tflops": fp32}, "projection": [
            project_study(REPO / "configs" / "studies" / f"{s}.yaml", flop_pieces(bf16, fp32))
            for s in ("matched_lr80", "paper21")]}
        print(f"ESTIMATE from FLOP counts (not a measurement): bf16 work at {bf16:g} TFLOP/s, "
              f"probe/aux forwards at {fp32:g} TFLOP/s, checkpoints and start-up free")
        print("\n".join(table_lines({"rows": [], **result})))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return result
    device = torch.device(args.device)
    rows_wanted = set(args.rows.split(","))
    result: dict[str, Any] = {"environment": environment(device),
                              "command": " ".join(["python", "benchmarks/run.py",
                                                   *(argv if argv is not None else sys.argv[1:])]),
                              "args": {k: (str(v) if isinstance(v, Path) else v)
                                       for k, v in vars(args).items()},
                              "rows": []}
    started = time.perf_counter()
    if "metrics" in rows_wanted:
        row = bench_metrics(args.metric_repeat, args.naive_repeat)
        result["rows"].append(row)
        result["metrics_speedup"] = row["speedup"]
        result["metrics_max_abs_diff"] = row["max_abs_diff"]
    if "model" in rows_wanted:
        rows, pieces = bench_model(args, device)
        result["rows"] += rows
        result["pieces"] = pieces
        result["probe_overhead_pct"] = rows[-1]["overhead_pct"]
        result["train_images_per_s"] = {r["method"]: r["images_per_s"] for r in rows
                                        if "method" in r}
        gain = 1.0
        if args.concurrent > 1:
            row = bench_concurrent(args)
            result["rows"].append(row)
            gain = max(1.0, row["images_per_s"] / result["train_images_per_s"]["full_ft"])
        if args.project:
            result["projection"] = [project_study(REPO / "configs" / "studies" / f"{s}.yaml",
                                                  pieces, gain)
                                    for s in ("matched_lr80", "paper21")]
    if "input" in rows_wanted:
        row = bench_input(args, device)
        result["rows"].append(row)
        result["input_images_per_s"] = {"cache": row["cache_images_per_s"],
                                        "pil": row["pil_images_per_s"]}
    result["elapsed_s"] = time.perf_counter() - started
    result["environment"]["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    env = result["environment"]
    print(f"attndrift benchmarks: {env['device']} ({env.get('gpu', env['cpu'])}), torch "
          f"{env['torch']}, {env['torch_threads']} threads, load {env['load_avg_1_5_15'][0]}, "
          f"model {args.model}, {result['elapsed_s']:.0f} s")
    print("\n".join(table_lines(result)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing, too
    main()
