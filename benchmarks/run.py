"""attndrift's performance table: metrics, probe overhead, training and input throughput, demo.

    python benchmarks/run.py --quick                  # < 1 min on 2 CPU cores (shipped tiny CLIP)
    python benchmarks/run.py --model vit-b32          # ViT-B/32 shapes, random weights
    python benchmarks/run.py --device cuda --model vit-b32 --compile --concurrent 2 --json out.json
    python benchmarks/run.py --rows demo              # the demo study: wall time, per-run shares

Every row is measured in this one process, side by side, on identical inputs; timings are the
best of several repeats (the median is kept in the JSON too): the best is what the code costs,
the rest is other processes on the machine. Rows: ``metrics`` (``summarize`` against the study's
per-batch pattern, ``naive_summarize``, on a ``[200, 12, 12, 49]`` ViT-B/32 probe); ``model``
(training images/s of full FT and LoRA, stepped as ``train.py`` does, and one training-time
probe as a share of the steps between two EuroSAT probes); ``input`` (uint8 cache +
``Preprocessor`` against per-image PIL); ``demo`` (``attndrift study run`` of
configs/studies/demo.yaml in a fresh store, and the runs' ``timing`` records); with ``--model
vit-b32``, the projected wall time of ``matched_lr80`` and ``paper21`` (``project_study``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pieces.py, also when imported
import pieces
from pieces import PROBE_SHAPE, REPO, STUDY_EVAL_BATCH, _rate, max_abs_diff, measure


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo()
                if line.startswith("model name")), platform.processor() or "unknown")
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cpu": cpu, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device": str(device),
           "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()]}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return env


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


# --- metrics: summarize vs the study's per-batch pattern ------------------------------------

def random_probe(shape: tuple[int, int, int, int] = PROBE_SHAPE, seed: int = 0) -> torch.Tensor:
    """CLS->patch maps ``[n, L, H, N]`` (float32) with a pretrained ViT-B/32's spread: softmax of
    random logits plus a fixed per-(layer, head) pattern, sharper in later layers (entropy ~3.65
    nats, ERF ~0.84, Gini ~0.34; the study's ViT-B/32: ERF 0.862, Gini 0.309, 003 §3.1)."""
    _, n_layers, n_heads, n_patches = shape
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 1.0, n_layers).view(1, n_layers, 1, 1)
    scale = scale * (0.75 + 0.5 * torch.rand(1, 1, n_heads, 1, generator=gen))
    pattern = torch.randn(1, n_layers, n_heads, n_patches, generator=gen)
    return ((torch.randn(shape, generator=gen) + 0.5 * pattern) * scale).softmax(dim=-1)


def naive_summarize(cls_patch: torch.Tensor, batch_size: int = STUDY_EVAL_BATCH,
                    mass: float = 0.95) -> dict[str, Any]:
    """The study's per-batch pattern, computing the same table as ``summarize``: per batch and
    layer, entropy, a descending sort + cumsum for ERF, an ascending sort for Gini, sums read
    back with ``.item()``; head diversity from the image-averaged maps by a loop over head
    pairs. ERF accumulates in float64 and compares with no tolerance, as the library does
    (000 eq. 2)."""
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
            cum = torch.sort(p, dim=-1, descending=True).values.double().cumsum(dim=-1)
            k = (cum < mass * cum[..., -1:]).sum(dim=-1) + 1
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


def bench_metrics(args) -> list[dict[str, Any]]:
    from attndrift.probes.metrics import summarize

    x, rounds = random_probe(PROBE_SHAPE), 4
    diff = max_abs_diff(summarize(x), naive_summarize(x))
    fast, slow = [], []  # alternating blocks: both sides meet the same moments of the load
    for _ in range(rounds):
        fast.append(measure(lambda: summarize(x), max(1, args.metric_repeat // rounds)))
        slow.append(measure(lambda: naive_summarize(x), max(1, args.naive_repeat // rounds)))
    fast_s, slow_s = min(t["best_s"] for t in fast), min(t["best_s"] for t in slow)
    return [{"row": "metrics", "shape": list(PROBE_SHAPE), "naive_batch": STUDY_EVAL_BATCH,
             "attndrift_ms": 1e3 * fast_s, "naive_ms": 1e3 * slow_s,
             "attndrift_median_ms": 1e3 * statistics.median(t["median_s"] for t in fast),
             "naive_median_ms": 1e3 * statistics.median(t["median_s"] for t in slow),
             "speedup": slow_s / fast_s, "max_abs_diff": diff,
             "cells": (f"metrics {'x'.join(map(str, PROBE_SHAPE))}", f"{1e3 * fast_s:.2f} ms",
                       f"naive b{STUDY_EVAL_BATCH} {1e3 * slow_s:.1f} ms",
                       f"{slow_s / fast_s:.1f}x", f"max |diff| {diff:.1e}")}]


# --- input pipeline -------------------------------------------------------------------------

def pil_batch(blobs: list[bytes], size: int, mean, std, device: torch.device) -> torch.Tensor:
    """The per-image path: PIL decode -> resize short side (bicubic) -> center crop -> tensor
    -> normalise, then stack and move the float batch to the device."""
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


def bench_input(args, device: torch.device) -> list[dict[str, Any]]:
    from PIL import Image

    from attndrift.data.base import Preprocessor
    from attndrift.data.cache import decode_all
    from attndrift.models.clip import OPENAI_MEAN, OPENAI_STD

    size, batch = 224, 64
    n_pil, n_cache = args.input_images, max(args.input_images, 4 * batch)
    images = pieces.eurosat_like(n_cache, seed=9)
    blobs = []
    for img in images[:n_pil]:
        buffer = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=95)
        blobs.append(buffer.getvalue())
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (OPENAI_MEAN, OPENAI_STD))
    pil = n_pil / measure(lambda: [pil_batch(blobs[s : s + batch], size, mean, std, device)
                                   for s in range(0, n_pil, batch)], 1, device)["best_s"]
    preprocess, flips = Preprocessor(size, OPENAI_MEAN, OPENAI_STD), torch.Generator()

    def cached(source: torch.Tensor) -> float:
        def go() -> None:
            for s in range(0, n_cache, batch):
                mask = preprocess.draw_flips(min(batch, n_cache - s), flips)
                preprocess(source[s : s + batch].to(device, non_blocking=True), flip_mask=mask)
        return n_cache / measure(go, args.input_repeat, device)["best_s"]

    row = {"row": "input pipeline", "size": size, "batch": batch, "pil_images_per_s": pil,
           "cache_images_per_s": cached(images)}
    row["speedup"] = row["cache_images_per_s"] / pil
    extra = ""
    if device.type == "cuda":  # the uint8 cache resident on the GPU: no per-step copy
        row["cache_on_device_images_per_s"] = cached(images.to(device))
        extra = f"; resident {_rate(row['cache_on_device_images_per_s'])}"
    decode = measure(lambda: decode_all((Image.open(io.BytesIO(b)) for b in blobs), n_pil,
                                        size, "bench", progress=False), 1)
    row["decode_all_images_per_s"] = n_pil / decode["best_s"]
    row["cells"] = ("input 64px -> 224", _rate(row["cache_images_per_s"]), f"PIL {_rate(pil)}",
                    f"{row['speedup']:.1f}x",
                    f"decode_all once {_rate(row['decode_all_images_per_s'])}{extra}")
    return [row]


# --- the demo study: wall time and what its runs spend it on ---------------------------------

PHASES = ("setup_s", "train_s", "probe_s", "zeroshot_s", "aux_s")  # keys of a record's timing


def bench_demo(args) -> list[dict[str, Any]]:
    """``attndrift study run configs/studies/demo.yaml --workers N`` (and ``attndrift report``)
    in a fresh store, as ``make demo`` runs them, timed from outside; then the per-run
    breakdown from each record's ``timing`` (what train.py measured inside the run: set-up,
    training steps with validation, probes, zero-shot, auxiliary metrics; "other" is the rest
    of the run's total: baseline/final evaluation, records, checkpoints). ``--demo-store DIR``:
    run into DIR and keep it, or only read its records if it has some (no wall time then)."""
    store = args.demo_store
    cli = [sys.executable, "-c", "from attndrift.cli import main; main()"]
    wall = report_s = None
    with tempfile.TemporaryDirectory() as tmp:
        if store is None or not any(store.glob("runs/*/record.json")):
            store = store or Path(tmp) / "demo"
            env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
            start = time.perf_counter()
            subprocess.run([*cli, "study", "run", str(REPO / "configs/studies/demo.yaml"),
                            "--store", str(store), "--workers", str(args.demo_workers)],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            subprocess.run([*cli, "report", str(store), "--out", str(store / "report")],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            report_s = time.perf_counter() - start - wall
        records = [json.loads(p.read_text()) for p in sorted(store.glob("runs/*/record.json"))]
    timings = [r.get("timing", {}) for r in records if r.get("status") == "completed"]
    total = sum(t.get("total_s", 0.0) for t in timings)
    shares = {k: sum(t.get(k, 0.0) for t in timings) / total if total else None for k in PHASES}
    shares["other_s"] = 1.0 - sum(v or 0.0 for v in shares.values()) if total else None
    per_run = total / len(timings) if timings else 0.0
    head = (f"{_duration(wall)} + report {_duration(report_s)}" if wall is not None
            else "(existing store)")
    return [{"row": "demo study", "runs": len(timings), "workers": args.demo_workers,
             "wall_s": wall, "report_s": report_s, "run_total_s": total, "per_run_s": per_run,
             "shares": shares, "store": None if wall is not None else str(store),
             "cells": ("demo study", head, f"{len(timings)} runs x {per_run:.1f} s, "
                       f"{args.demo_workers} workers", "", ", ".join(
                           f"{k[:-2]} {100 * v:.0f}%" for k, v in shares.items()
                           if v is not None))}]


# --- table and entry point -------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size, limit in (("s", 1, 120), ("min", 60, 120), ("h", 3600, 48)):
        if seconds / size < limit:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds / 86400:.1f} days"


def table_lines(result: dict[str, Any]) -> list[str]:
    lines = [r["cells"] for r in result["rows"]]
    lines += [(f"projected {p['study']}", _duration(p["wall_s"]), f"{p['runs']} runs, one after "
               f"another {_duration(p['serial_s'])}", "",
               f"concurrency gain {p['concurrency_gain']:.2f}")
              for p in result.get("projection", [])]
    header = ("row", "attndrift", "reference", "ratio", "notes")
    widths = [max(len(str(c[i])) for c in [header, *lines]) for i in range(5)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*c).rstrip() for c in [header, ["-" * w for w in widths], *lines]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--quick", action="store_true", help="small repeats; < 1 min on 2 CPU cores")
    add("--json", type=Path, help="also write the results as JSON to this file")
    add("--model", choices=["tiny", "vit-b32"], help="tiny (default with --quick or on the CPU)"
        " or vit-b32 (random weights)")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    add("--rows", default="metrics,model,input", help="comma list of metrics, model (train + "
        "probe), input, demo")
    add("--batch", type=int, help="training batch (default 64; 8 for vit-b32 on the CPU)")
    add("--steps", type=int, help="timed training steps per method")
    add("--warmup-steps", type=int, default=2)
    add("--precision", choices=["auto", "fp32", "bf16"], default="auto",
        help="training autocast as train.precision (auto: bf16 on CUDA)")
    add("--probe-precision", choices=["fp32", "bf16"], default="fp32", help="probe.precision")
    add("--probe-batch", type=int, default=64, help="probe.batch_size")
    add("--compile", action="store_true", help="torch.compile the training model")
    add("--concurrent", type=int, default=0, help="also train this many processes at once")
    add("--seconds", type=float, default=30.0, help="timed window per concurrent worker")
    add("--concurrent-startup", type=float, default=90.0,
        help="seconds the workers get to load and warm up before the common start")
    add("--no-project", dest="project", action="store_false",
        help="skip the study projection (on by default with vit-b32)")
    add("--flop-estimate", metavar="BF16,FP32", help="only print the studies' projected wall "
        "time from FLOP counts at these sustained TFLOP/s (measures nothing), e.g. 320,50")
    add("--demo-workers", type=int, default=2, help="demo row: study run --workers")
    add("--demo-store", type=Path, help="demo row: run into this store and keep it; if it "
        "has records, only read them")
    add("--worker", help=argparse.SUPPRESS)
    add("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = args.device == "cpu"
    args.model = args.model or ("tiny" if args.quick or cpu else "vit-b32")
    big_on_cpu = cpu and args.model == "vit-b32"
    args.batch = args.batch or (8 if big_on_cpu else 64)
    args.steps = args.steps or (3 if big_on_cpu else 10 if args.quick else 30)
    args.block = min(1 if big_on_cpu else 5 if cpu else 10, args.steps)  # steps timed together
    args.metric_repeat, args.naive_repeat = (80, 8) if args.quick else (200, 20)
    args.probe_repeat = 1 if big_on_cpu else 3
    args.probe_images = 32 if big_on_cpu else 200  # timed; scaled to the real 200
    args.io_repeat, args.io_warmup = (1, 0) if big_on_cpu else (2, 1)
    args.input_images, args.input_repeat = (128, 2) if args.quick else (512, 5)
    args.eval_images, args.eval_batch = (16, 16) if big_on_cpu else (512, 256)
    args.project = args.project and args.model == "vit-b32"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        pieces.worker(args)
        return {}
    studies = [REPO / "configs" / "studies" / f"{s}.yaml" for s in ("matched_lr80", "paper21")]
    if args.flop_estimate:
        bf16, fp32 = (float(v) for v in args.flop_estimate.split(","))
        result = {"flop_estimate": {"bf16_tflops": bf16, "fp32_tflops": fp32}, "rows": [],
                  "projection": [pieces.project_study(s, pieces.flop_pieces(bf16, fp32))
                                 for s in studies]}
        print(f"ESTIMATE from FLOP counts (not a measurement): bf16 work at {bf16:g} TFLOP/s, "
              f"probe/aux forwards at {fp32:g} TFLOP/s, checkpoints and start-up free")
    else:
        device, wanted = torch.device(args.device), set(args.rows.split(","))
        command = ["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]
        result = {"environment": environment(device), "command": " ".join(command), "rows": [],
                  "args": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()}}
        started, rows = time.perf_counter(), result["rows"]
        if "metrics" in wanted:
            rows += bench_metrics(args)
            result["metrics_speedup"] = rows[-1]["speedup"]
        if "model" in wanted:
            model_rows, run_pieces = pieces.bench_model(args, device)
            rows += model_rows
            result.update(pieces=run_pieces, probe_overhead_pct=model_rows[-1]["overhead_pct"],
                          train_images_per_s={r["method"]: r["images_per_s"]
                                              for r in model_rows if "method" in r})
            gain = 1.0
            if args.concurrent > 1:
                rows.append(pieces.bench_concurrent(args))
                gain = max(1.0, rows[-1]["images_per_s"] / result["train_images_per_s"]["full_ft"])
            if args.project:
                result["projection"] = [pieces.project_study(s, run_pieces, gain) for s in studies]
        if "input" in wanted:
            rows += bench_input(args, device)
        if "demo" in wanted:
            rows += bench_demo(args)
        result["elapsed_s"] = time.perf_counter() - started
        env = result["environment"]
        env["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
        print(f"attndrift benchmarks: {env['device']} ({env.get('gpu', env['cpu'])}), torch "
              f"{env['torch']}, {env['torch_threads']} threads, load "
              f"{env['load_avg_1_5_15'][0]}, model {args.model}, {result['elapsed_s']:.0f} s")
    print("\n".join(table_lines(result)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing, too
    main()
