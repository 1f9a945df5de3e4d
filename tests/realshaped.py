"""A store of synthetic records shaped like a real multi-backbone study (issue 12).

`write_store(root)` writes, through the project's record writer, 101 records with every field
the analysis and the report read, shaped as `attndrift run` writes them (checked against a real
record of configs/runs/tiny_lora.yaml): 12 layers x 12 heads; ViT-B/32 and ViT-B/16; EuroSAT
and Pets; full FT at three learning rates, LoRA r=8 (alpha 16) at two, r=4 (alpha 8) and r=16
(alpha 32); a weight-decay variant of full FT; APR on one backbone and dataset; seeds 7, 11, 19
(so that text order differs from numeric order); zero-shot on CIFAR-100 and Flowers102; five
fixed probe subsets; probe histories; auxiliary metrics. On top of that:

- one record (seed 101 of `NO_HEADDIV`) has no head diversity anywhere and no loss history;
- one run (seed 23 of `FAILED_IN`) failed after its baseline;
- every run of `NOT_CONVERGED` still gains validation accuracy in its last epochs.

The ground truth is `SPECS` and the returned mapping run directory -> spec name: tests group
runs by it, independently of `attndrift.analysis`, and recompute every mean from the records.
Values are drawn from seeded generators: the same store on every call.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from attndrift.config import RunConfig
from attndrift.records import SCHEMA_VERSION, write_record

LAYERS, HEADS, SUBSETS = 12, 12, 5
METRICS = ("entropy", "erf", "gini", "head_diversity")
MODELS = ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch16")
DATASETS = ("eurosat", "pets")
ZS_TASKS = ("cifar100", "flowers102")
SEEDS = (7, 11, 19)
EPOCHS = 5
# How each metric follows the entropy drift (Gini moves opposite, as in the real runs).
FOLLOW = {"entropy": 1.0, "erf": 1.4, "gini": -2.5, "head_diversity": 0.6}


@dataclass(frozen=True)
class Spec:
    """One setting as designed: what it is, and the drift its seeds scatter around."""

    name: str
    model: str
    dataset: str
    method: str
    lr: float
    drift: float  # target Δ entropy % of the layer mean
    lora: tuple[int, float] | None = None  # (r, alpha)
    weight_decay: float = 0.01
    regularizer: tuple[str, float] | None = None  # (name, lam)
    converged: bool = True
    seeds: tuple[int, ...] = SEEDS


def _specs() -> list[Spec]:
    out = []
    for model in MODELS:
        b16 = "patch16" in model
        for dataset in DATASETS:
            tag = f"{'b16' if b16 else 'b32'}_{dataset}"
            sign = 1.0 if b16 else -1.0  # B/16 entropy rises where B/32's falls (issue 12)
            shift = 0.5 if dataset == "pets" else 0.0
            for lr, d in ((1e-5, 0.5), (3e-5, 2.0), (1e-4, 6.0)):
                out.append(
                    Spec(
                        f"{tag}_ft_{lr:g}",
                        model,
                        dataset,
                        "full_ft",
                        lr,
                        sign * d + shift,
                        converged=not (b16 and dataset == "pets" and lr == 1e-5),
                    )
                )
            out.append(
                Spec(
                    f"{tag}_ft_wd0.1_1e-05",
                    model,
                    dataset,
                    "full_ft",
                    1e-5,
                    sign * 1.5 + shift,
                    weight_decay=0.1,
                )
            )
            for lr, d in ((1e-4, 0.6), (1e-3, -1.2)):
                out.append(
                    Spec(
                        f"{tag}_lora8_{lr:g}",
                        model,
                        dataset,
                        "lora",
                        lr,
                        d + shift,
                        lora=(8, 16.0),
                        seeds=SEEDS
                        + ((101,) if (b16, dataset, lr) == (True, "pets", 1e-3) else ()),
                    )
                )
            out.append(
                Spec(f"{tag}_lora4_1e-04", model, dataset, "lora", 1e-4, 0.3 + shift, lora=(4, 8.0))
            )
            out.append(
                Spec(
                    f"{tag}_lora16_1e-04",
                    model,
                    dataset,
                    "lora",
                    1e-4,
                    0.9 + shift,
                    lora=(16, 32.0),
                )
            )
            if not b16 and dataset == "eurosat":
                out.append(
                    Spec(
                        f"{tag}_ft_apr0.1_1e-04",
                        model,
                        dataset,
                        "full_ft",
                        1e-4,
                        -2.0,
                        regularizer=("apr", 0.1),
                    )
                )
    return out


SPECS = {s.name: s for s in _specs()}
NO_HEADDIV = ("b16_pets_lora8_0.001", 101)
FAILED_IN = ("b16_eurosat_ft_0.0001", 23)
NOT_CONVERGED = "b16_pets_ft_1e-05"


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32("/".join(map(str, parts)).encode()))


def _baseline_layers(model: str, dataset: str) -> dict[str, np.ndarray]:
    """The pretrained model's per-layer, per-head values on a dataset's probe set [L, H]."""
    rng = _rng("baseline", model, dataset)
    depth = np.linspace(0, 1, LAYERS)[:, None]
    top = math.log(196 if "patch16" in model else 49)  # uniform attention over the patches
    heads = {
        "entropy": top * (0.45 + 0.35 * depth + 0.08 * rng.standard_normal((LAYERS, HEADS))),
        "erf": 0.35 + 0.4 * depth + 0.05 * rng.standard_normal((LAYERS, HEADS)),
        "gini": 0.65 - 0.3 * depth + 0.04 * rng.standard_normal((LAYERS, HEADS)),
    }
    heads["head_diversity"] = 0.08 + 0.2 * depth[:, 0] + 0.02 * rng.standard_normal(LAYERS)
    return heads


def _block(heads: dict[str, np.ndarray], metrics: tuple[str, ...]) -> dict[str, Any]:
    """A metrics block as the probe writes it: layers (mean over heads), heads, layer mean."""
    out: dict[str, Any] = {}
    for m in metrics:
        h = heads[m]
        out[m] = (
            {"layers": h.tolist()}
            if h.ndim == 1
            else {"layers": h.mean(axis=1).tolist(), "heads": h.tolist()}
        )
    out["mean"] = {m: float(np.mean(out[m]["layers"])) for m in metrics}
    return out


def _moved(base: dict[str, np.ndarray], layer_drift: np.ndarray) -> dict[str, np.ndarray]:
    """Baseline values moved by a per-layer entropy drift (%), each metric by its FOLLOW."""
    out = {}
    for m, b in base.items():
        factor = 1 + FOLLOW[m] * layer_drift / 100
        out[m] = b * (factor[:, None] if b.ndim == 2 else factor)
    return out


def _subsets(mean: dict[str, float], rng: np.random.Generator, metrics) -> list[dict]:
    """Layer means on the five fixed probe subsets (the first is the probed one)."""
    out = [dict(mean)]
    for _ in range(SUBSETS - 1):
        out.append({m: mean[m] * (1 + 0.02 * rng.standard_normal()) for m in metrics})
    return out


def _pct(a: float, b: float) -> float:
    return 100.0 * (a - b) / b


def _config(spec: Spec, seed: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": spec.name,
        "seed": seed,
        "model": spec.model,
        "method": spec.method,
        "train": {
            "epochs": EPOCHS,
            "batch_size": 128,
            "lr": spec.lr,
            "weight_decay": spec.weight_decay,
            "flip": True,
        },
        "data": {"dataset": spec.dataset, "zeroshot": list(ZS_TASKS)},
        "probe": {"per_epoch": 1, "images": 200, "aux": ["rollout", "cka", "drift"]},
        "device": "cuda",
    }
    if spec.lora:
        cfg["lora"] = {"r": spec.lora[0], "alpha": spec.lora[1]}
    if spec.regularizer:
        cfg["regularizer"] = {"name": spec.regularizer[0], "lam": spec.regularizer[1]}
    # seed 7's runs checkpoint every 5 minutes: operational, must not split the setting
    if seed == 7:
        cfg["train"]["checkpoint_minutes"] = 5.0
    return RunConfig(**cfg).model_dump(mode="json")


def _aux(base: dict[str, np.ndarray], drift: np.ndarray, rng, before: bool) -> dict[str, Any]:
    ent = base["entropy"].mean(axis=1) * (1 + drift / 100)
    out = {
        "rollout_entropy": float(ent.mean() * 1.3),
        "rollout_erf": 0.8 + 0.01 * float(drift.mean()),
        "rollout_gini": 0.3 - 0.01 * float(drift.mean()),
        "p2p_entropy": float(ent.mean() * 1.1),
        "p2p_entropy_layers": (ent * 1.1).tolist(),
    }
    if not before:
        cka = np.clip(1 - np.abs(drift) / 40 - 0.02 * rng.random(LAYERS), 0, 1)
        out.update(
            {
                "cka_cls": cka.tolist(),
                "cka_patch": np.sqrt(cka).tolist(),
                "embedding_drift": float(np.abs(drift).mean() / 10),
                "weight_drift": float(np.abs(drift).mean() / 50),
                "weight_drift_layers": (np.abs(drift) / 50).tolist(),
            }
        )
    return out


def make_record(spec: Spec, seed: int, *, status: str = "completed",
                drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """One record of ``spec``; metrics named in ``drop`` are absent from it altogether (as in the
    study's own released records, which have no head diversity)."""
    rng = _rng(spec.name, seed)
    metrics = METRICS if (spec.name, seed) != NO_HEADDIV else METRICS[:3]
    metrics = tuple(m for m in metrics if m not in drop)
    base = {m: v for m, v in _baseline_layers(spec.model, spec.dataset).items() if m in metrics}
    run_drift = spec.drift + rng.normal(0, 0.8)
    profile = np.linspace(0.4, 1.6, LAYERS)  # later layers move more
    layer_drift = run_drift * profile + 0.5 * rng.standard_normal(LAYERS)
    base_block = _block(base, metrics)
    base_block["subsets"] = _subsets(
        base_block["mean"], _rng("subsets", spec.model, spec.dataset), metrics
    )
    base_block["aux"] = {k: v for k, v in _aux(base, np.zeros(LAYERS), rng, True).items()}
    cfg = _config(spec, seed)
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": f"{spec.name}-{seed:08x}",
        "status": status,
        "config": cfg,
        "provenance": {
            "attndrift": "0.1.0",
            "python": "3.11.7",
            "torch": "2.13.0+cu128",
            "transformers": "5.24.0",
            "peft": "0.21.2",
            "platform": "Linux",
            "device": "cuda",
            "gpu": "NVIDIA H200",
            "cpu_threads": 16,
            "git_commit": "0123456789abcdef",
            "model_source": spec.model,
            "model_sha256": f"{zlib.crc32(spec.model.encode()):016x}",
            "data": {"dataset": spec.dataset, "sizes": {"train": 21600, "val": 2700, "probe": 200}},
            "parameters": {"trainable": 1000, "total": 88_000_000},
        },
        "baseline": base_block,
        "history": {"probes": [], "epochs": [], "loss": []},
        "final": {},
        "zeroshot": {},
        "timing": {"setup_s": 12.0},
        "warnings": [],
    }
    if status == "failed":
        record["error"] = "RuntimeError: CUDA error: an illegal memory access"
        return record
    steps_per_epoch = 170
    for k in range(1, EPOCHS + 1):
        frac = k / EPOCHS
        heads = _moved(base, layer_drift * math.sqrt(frac))
        record["history"]["probes"].append(
            {
                "step": k * steps_per_epoch,
                "epoch": float(k),
                "fraction": frac,
                "metrics": _block(heads, metrics),
            }
        )
    final_acc = 0.97 - 0.05 * DATASETS.index(spec.dataset) - 0.02 * rng.random()
    for k in range(1, EPOCHS + 1):
        rise = 0.03 * (EPOCHS - k) if not spec.converged else 0.001 * (EPOCHS - k) ** 2 / 4
        record["history"]["epochs"].append(
            {
                "epoch": k,
                "step": k * steps_per_epoch,
                "val_acc": final_acc - rise + 0.0005 * rng.standard_normal(),
            }
        )
    if (spec.name, seed) != NO_HEADDIV:
        record["history"]["loss"] = [
            {"step": s, "loss": 2.5 / (1 + s / 100), "lr": spec.lr}
            for s in range(10, EPOCHS * steps_per_epoch + 1, 85)
        ]
    fin = record["history"]["probes"][-1]["metrics"]
    fin_subsets = _subsets(fin["mean"], rng, metrics)
    vals = [e["val_acc"] for e in record["history"]["epochs"]]
    best = int(np.argmax(vals))
    record["final"] = {
        "step": EPOCHS * steps_per_epoch,
        "epochs": float(EPOCHS),
        "val_acc": vals[-1],
        "best_val_acc": vals[best],
        "best_epoch": best + 1,
        "test_acc": vals[best] - 0.01 - 0.03 * rng.random(),
        "train_loss": 0.1 + 0.05 * rng.random(),
        "metrics": fin,
        "delta_pct": {m: _pct(fin["mean"][m], base_block["mean"][m]) for m in metrics},
        "delta_pct_layers": {
            m: [_pct(a, b) for a, b in zip(fin[m]["layers"], base_block[m]["layers"], strict=True)]
            for m in metrics
        },
        "subsets": fin_subsets,
        "delta_pct_subset_mean": {
            m: float(
                np.mean(
                    [
                        _pct(f[m], b[m])
                        for f, b in zip(fin_subsets, base_block["subsets"], strict=True)
                    ]
                )
            )
            for m in metrics
        },
        "aux": {
            **_aux(base, layer_drift, rng, False),
            "subset_cv": {
                m: float(np.std([f[m] for f in fin_subsets]) / np.mean([f[m] for f in fin_subsets]))
                for m in metrics
            },
        },
    }
    for t, task in enumerate(ZS_TASKS):
        before = (0.62 if "patch16" in spec.model else 0.58) + 0.1 * t
        kept = 0.95 if spec.method == "lora" else max(0.05, 0.6 - 2000 * spec.lr)
        after = before * min(1.0, kept + 0.03 * rng.standard_normal())
        record["zeroshot"][task] = {
            "before": before,
            "after": after,
            "retention_pct": 100 * after / before,
            "chance": 1 / (100 if t == 0 else 102),
            "classes": 100 if t == 0 else 102,
        }
    if spec.model.endswith("patch32") and spec.dataset == "eurosat" and seed != 7:
        # zero-shot tracked during training (probe.zeroshot_every = 1; seed 7 does not track:
        # an extra measurement must not split the setting): forgetting comes early, faster than
        # the attention drift (whose trajectory grows with sqrt(fraction))
        zs_before = {task: record["zeroshot"][task]["before"] for task in ZS_TASKS}
        record["baseline"]["zeroshot_subset"] = zs_before
        record["config"]["probe"]["zeroshot_every"] = 1
        for probe in record["history"]["probes"]:
            early = min(1.0, 3 * probe["fraction"])
            probe["zeroshot"] = {
                task: zs_before[task]
                + early * (record["zeroshot"][task]["after"] - zs_before[task])
                for task in ZS_TASKS
            }
    record["timing"] = {
        "setup_s": 12.0,
        "train_s": 300 + 10 * rng.random(),
        "probe_s": 20.0,
        "zeroshot_s": 15.0,
        "aux_s": 5.0,
        "steps": EPOCHS * steps_per_epoch,
        "probes": EPOCHS,
        "train_images_per_s": 900.0,
        "total_s": 360.0,
    }
    record["sanity"] = {
        f"{spec.dataset} (validation)": {"zeroshot": 0.4, "chance": 0.1, "ok": True},
        **{t: {"zeroshot": 0.6, "chance": 0.01, "ok": True} for t in ZS_TASKS},
    }
    return record


def write_store(root: Path, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """Write every run of `SPECS` (plus the failed one) under ``root``; returns run directory
    name -> spec name, the ground truth of which runs are replicates. ``drop``: metrics no
    record of this store has (e.g. ``("head_diversity",)``)."""
    root = Path(root)
    truth = {}
    for spec in SPECS.values():
        seeds = list(spec.seeds) + ([FAILED_IN[1]] if spec.name == FAILED_IN[0] else [])
        for seed in seeds:
            status = "failed" if (spec.name, seed) == FAILED_IN else "completed"
            d = f"{spec.name}_s{seed}"
            record = make_record(spec, seed, status=status, drop=drop)
            write_record(root / d / "record.json", record)
            truth[d] = spec.name
    return truth
