"""Walk a finished run back toward its pretrained model: accuracy, forgetting and attention
along ``alpha`` in [0, 1] (0 = pretrained encoder, 1 = the fine-tuned one).

Each method names its scheme in its `attndrift.methods.MethodSpec`:

- wise-ft (full_ft, freeze, last_block): WiSE-FT (Wortsman et al., 2022) weight interpolation
  ``theta(alpha) = (1 - alpha) * theta_pretrained + alpha * theta_finetuned`` of every trainable
  vision-tower and visual-projection tensor (frozen tensors are pretrained at every alpha).
- lora-scale (lora): the adapter delta is scaled, ``W + alpha * (B @ A) * scaling``, through
  PEFT's own per-adapter scale (``LoraLayer.set_scale``), which equals merging
  ``alpha * delta W``; the visual projection, when trained as a full tensor, is interpolated
  as in WiSE-FT (frozen, it is pretrained at every alpha).
- dora-scale (dora): as lora-scale, and each DoRA magnitude vector is interpolated from its
  initial value, the row norms of the pretrained weight (PEFT's DoRA initialisation), so
  alpha = 0 is again exactly the pretrained weight.
- none (linear_probe): the encoder never changed; every alpha is the fine-tuned model.

The classification head is always the fine-tuned one: it was trained from scratch on the task,
so there is no pretrained head to interpolate toward (WiSE-FT interpolates a zero-shot head,
which a CLIP classifier of this kind does not have). Task accuracy at small alpha therefore
measures the trained head on a drifting encoder; zero-shot accuracy and attention do not use
the head at all, and at alpha = 0 they are exactly the pretrained model's (the record's
``zeroshot[task]["before"]`` and ``baseline``), at alpha = 1 exactly the run's (``after``,
``final.metrics``).

Writes ``RUN_DIR/interpolation.json`` atomically and returns the same dict.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from attndrift.methods import METHODS

SCHEMA_VERSION = 1
INTERPOLATION_FILE = "interpolation.json"
# Each method declares its scheme (`attndrift.methods.MethodSpec.scheme`).
SCHEMES = {name: spec.scheme for name, spec in METHODS.items()}


class NotATrainingRun(ValueError):
    """The directory holds a record that no attndrift training run wrote (a measurement)."""


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """The alphas as floats; ValueError if empty or any is outside [0, 1] (or not finite)."""
    values = [float(a) for a in alphas]
    if not values:
        raise ValueError("give at least one alpha")
    bad = [a for a in values if not (math.isfinite(a) and 0.0 <= a <= 1.0)]
    if bad:
        raise ValueError(f"alpha must be in [0, 1], got {bad[0]:g}")
    return values


def _lora_layers(model: torch.nn.Module) -> list[tuple[Any, list[str]]]:
    layers = []
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "set_scale"):
            if module.merged:
                raise ValueError("LoRA layers are merged; interpolation needs them unmerged")
            active = [a for a in module.active_adapters if a in module.lora_A]
            layers.append((module, active))
    return layers


class _Interpolator:
    """Sets a restored run's model to ``alpha`` in place (``set``) and back (``restore``)."""

    def __init__(self, model: torch.nn.Module, pretrained: dict[str, torch.Tensor]) -> None:
        self.finetuned: dict[str, torch.Tensor] = {}
        self.pretrained: dict[str, torch.Tensor] = {}
        self.params = dict(model.named_parameters())
        for name, param in self.params.items():
            if ".lora_magnitude_vector." in name:  # DoRA: starts at the base weight's row norms
                base = name.split(".lora_magnitude_vector.")[0] + ".weight"
                self.finetuned[name] = param.detach().clone()
                self.pretrained[name] = torch.linalg.norm(pretrained[base].float(), dim=1).to(
                    param.device, param.dtype)
                continue
            if not param.requires_grad or name.startswith("head.") or ".lora_" in name:
                continue
            base = name.replace(".base_layer", "")
            if base not in pretrained:
                raise ValueError(f"no pretrained tensor for {name}")
            self.finetuned[name] = param.detach().clone()
            self.pretrained[name] = pretrained[base].to(param.device, param.dtype)
        self.lora = _lora_layers(model)

    @torch.no_grad()
    def set(self, alpha: float) -> None:
        for name, ft in self.finetuned.items():
            # (1 - a) * pre + a * ft, not lerp: exact at both ends.
            self.params[name].copy_((1.0 - alpha) * self.pretrained[name] + alpha * ft)
        for module, adapters in self.lora:
            for adapter in adapters:
                module.set_scale(adapter, alpha)  # scaling = alpha * lora_alpha / r

    def restore(self) -> None:
        self.set(1.0)


def _completed_record(run_dir: Path) -> tuple[dict[str, Any], Any]:
    """The record of a completed training run in ``run_dir`` and its validated config;
    refuses anything else."""
    from attndrift.config import validate
    from attndrift.records import read_record

    record = read_record(run_dir)
    if record["config"].get("method") == "external":
        raise NotATrainingRun(
            f"{run_dir} is a measured record (attndrift measure): interpolation walks a "
            "training run of attndrift back to its pretrained weights; give a run directory "
            "written by attndrift run"
        )
    if record["status"] != "completed":
        raise ValueError(f"{run_dir}: run is {record['status']}; only completed runs can be "
                         "interpolated")
    return record, validate(record["config"], str(run_dir))


def _run_splits(run_dir: Path, cfg: Any, record: dict[str, Any], size: int) -> tuple[Any, Any]:
    """The run's validation split and probe images, rebuilt exactly as train.py built them and
    checked against the record's fingerprints."""
    from attndrift.data.registry import load_task
    from attndrift.data.splits import balanced_subset, index_fingerprint, run_split

    source = load_task(cfg.data.dataset, "train", image_size=size)
    budget = cfg.data.budget  # the probe pool: validation, or the budget's probe split
    _, val_idx, pool_idx = run_split(source.labels, cfg.data.val_frac, cfg.data.split_seed,
                                     (budget.train, budget.val, budget.probe) if budget else None)
    val_set = source.subset(val_idx, f"{source.name}/val")
    pool = source.subset(pool_idx, f"{source.name}/probe")
    probe_idx = balanced_subset(pool.labels, cfg.probe.images, cfg.probe.seed)
    data = record["provenance"].get("data", {})
    for key, index in (("val_ids", val_idx), ("probe_ids", pool_idx[probe_idx])):
        saved = data.get(key)
        saved = saved[0] if isinstance(saved, list) and saved else saved  # probe subset 0
        if saved is not None and saved != index_fingerprint(index):
            raise ValueError(f"{run_dir}: the rebuilt {key[:-4]} split differs from the run's "
                             f"({cfg.data.dataset} changed since the run?)")
    return val_set, pool.images[probe_idx]


def interpolate_run(run_dir: str | Path, alphas: Sequence[float], *,
                    device: str | torch.device = "cpu", batch_size: int = 256) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` at each alpha and write ``interpolation.json``.

    Each row holds ``alpha``, ``val_acc`` (the run's validation split, rebuilt as training
    built it and checked against the record's fingerprint), ``test_acc``, ``zeroshot``
    (per transfer task, frozen text tower), ``metrics`` (``summarize`` of the CLS->patch
    attention on the run's probe subset) and ``delta_pct`` (layer-mean drift from the record's
    pretrained baseline).

    Raises:
        RecordError: no readable record; ValueError: run not completed, bad alpha, data that
        no longer matches the record; FileNotFoundError: no checkpoint of the evaluated weights
        (``final.evaluated``: final, or best with ``eval.checkpoint: best``).
    """
    from attndrift.data.prompts import zeroshot_tasks
    from attndrift.data.registry import load_task
    from attndrift.evaluate import accuracy, probe_attention, zeroshot_all
    from attndrift.models.clip import load_clip
    from attndrift.models.restore import restore_run
    from attndrift.probes.metrics import METRICS, delta_pct, summarize
    from attndrift.records import atomic_write_bytes, evaluated_checkpoint, jsonable
    from attndrift.zeroshot import text_classifier

    t0 = time.perf_counter()
    alphas = check_alphas(alphas)
    run_dir = Path(run_dir)
    record, cfg = _completed_record(run_dir)
    prec = cfg.train.precision
    dev = torch.device(device)

    checkpoint = evaluated_checkpoint(record)  # the weights the record's numbers measured
    loaded, adapted = restore_run(run_dir, checkpoint, dev)
    size = loaded.image_size  # datasets cached at the model's input size, as train.py did
    val_set, probe_images = _run_splits(run_dir, cfg, record, size)
    test_set = load_task(cfg.data.dataset, "test", image_size=size)
    zs_tasks = zeroshot_tasks(cfg.data.zeroshot, cfg.data.zeroshot_eval, image_size=size)[0]

    model = adapted.model.eval()  # the fine-tuned run, walked toward the pretrained tensors
    preprocess = loaded.preprocessor()
    walker = _Interpolator(model, {
        n: p.detach().cpu() for n, p in load_clip(cfg.model).model.named_parameters()
        if n.startswith(("vision_model.", "visual_projection."))})
    zs_weights = {name: text_classifier(loaded.model, loaded.tokenizer, t.class_names,
                                        t.templates, dev) for name, t in zs_tasks.items()}
    baseline = record["baseline"]["mean"]

    rows = []
    try:
        for alpha in alphas:
            walker.set(alpha)
            metrics = summarize(probe_attention(model, probe_images, preprocess, dev,
                                                cfg.probe.batch_size, cfg.probe.precision,
                                                on_device=True))
            rows.append({
                "alpha": alpha,
                "val_acc": accuracy(model, val_set, preprocess, dev, batch_size, prec),
                "test_acc": accuracy(model, test_set, preprocess, dev, batch_size, prec),
                "zeroshot": zeroshot_all(model, zs_weights, zs_tasks, preprocess, dev,
                                         batch_size, prec),
                "metrics": metrics,
                "delta_pct": {m: delta_pct(metrics["mean"][m], baseline[m]) for m in METRICS},
            })
    finally:
        walker.restore()

    result = {
        "schema_version": SCHEMA_VERSION,
        "run_id": record["run_id"],
        "method": cfg.method,
        "scheme": SCHEMES[cfg.method],
        "checkpoint": checkpoint,
        "head": "fine-tuned at every alpha (trained from scratch: no pretrained head)",
        "alphas": alphas,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    text = json.dumps(jsonable(result), indent=1, allow_nan=False)
    atomic_write_bytes(run_dir / INTERPOLATION_FILE, text.encode())
    return result


def interpolation_table(result: dict[str, Any]):
    """A rich Table of an ``interpolate_run`` result: one row per alpha."""
    from rich.table import Table

    rows = result["rows"]
    tasks = list(rows[0]["zeroshot"]) if rows else []
    table = Table(title=f"{result['run_id']} ({result['scheme']}): 0 = pretrained, "
                        "1 = fine-tuned")
    for col in ("alpha", "val acc", "test acc", *(f"zs {t}" for t in tasks), "entropy",
                "Δ entropy"):
        table.add_column(col, justify="right")
    for row in rows:
        delta = row["delta_pct"]["entropy"]
        table.add_row(f"{row['alpha']:g}", f"{100 * row['val_acc']:.1f}%",
                      f"{100 * row['test_acc']:.1f}%",
                      *(f"{100 * row['zeroshot'][t]:.1f}%" for t in tasks),
                      f"{row['metrics']['mean']['entropy']:.3f}",
                      "-" if delta is None or not math.isfinite(delta) else f"{delta:+.2f}%")
    return table
