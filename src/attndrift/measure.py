"""Measure a CLIP fine-tuned anywhere against its pretrained reference: one run record.

``measure`` runs the passes a training run runs before and after training, on the same fixed
probe subsets (the validation split carved from DATASET's training split, then the
class-balanced subsets, 002 §4.3): the attention probe (every metric per layer and head) of
the reference and of the fine-tuned model, the auxiliary metrics against the reference
(rollout, patch-to-patch, CKA, weight and embedding drift), zero-shot accuracy of both on
each transfer task (each through its own image encoder and its own text tower, 002 §4.4),
and task accuracy when the checkpoint has a classification head (attndrift runs). It writes
``OUT/record.json`` of the run schema with method ``external``, so ``report``, ``compare``
and the statistics read it like any run; several checkpoints of one reference measured into
one directory tree form a store.

What a record cannot know about a foreign fine-tune is left out rather than guessed: there
is no training history, and ``train.lr`` is recorded only when given. ``external.recipe``
names the fine-tuning recipe: checkpoints of one recipe that differ only in ``seed`` are
replicates of one setting in the report's tables and statistics.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from attndrift.models.classifier import CLIPClassifier
from attndrift.models.external import detect_format, load_finetuned

OVERRIDABLE = ("data.", "probe.", "train.precision")


def resolve_settings(
    finetuned: str,
    fmt: str = "auto",
    dataset: str | None = None,
    zeroshot: list[str] | None = None,
    overrides: list[str] | None = None,
):
    """The ``(DataConfig, ProbeConfig, precision, run config or None)`` a measurement uses.

    A run directory starts from its own data, probe and precision settings (so its probe set
    is the run's); anything else from a run's defaults. ``dataset``, ``zeroshot`` and
    ``overrides`` (``data.*``, ``probe.*``, ``train.precision``) apply on top.

    Raises:
        ConfigError: a bad override, or no dataset for a checkpoint that is not a run.
    """
    from attndrift.config import ConfigError, apply_overrides, validate
    from attndrift.records import read_record

    overrides = list(overrides or [])
    for item in overrides:
        if not item.split("=", 1)[0].strip().startswith(OVERRIDABLE):
            raise ConfigError(
                f"override {item!r}: measure takes data.*, probe.* and train.precision overrides"
            )
    run_config = None
    base: dict[str, Any] = {}
    if fmt in ("run", "auto") and (Path(finetuned) / "record.json").is_file():
        run_config = read_record(Path(finetuned))["config"]
        base = {
            "data": dict(run_config.get("data") or {}),
            "probe": dict(run_config.get("probe") or {}),
            "train": {"precision": (run_config.get("train") or {}).get("precision", "auto")},
        }
    elif dataset is None and not any(o.startswith("data.dataset=") for o in overrides):
        raise ConfigError(
            "give --data DATASET (the dataset whose validation split holds the probe images)"
        )
    if dataset is not None:
        base.setdefault("data", {})["dataset"] = dataset
    if zeroshot is not None:
        base.setdefault("data", {})["zeroshot"] = list(zeroshot)
    cfg = validate(apply_overrides(base, overrides), "measure settings")
    return cfg.data, cfg.probe, cfg.train.precision, run_config


def _classifier(clip: torch.nn.Module) -> CLIPClassifier:
    return CLIPClassifier(clip.vision_model, clip.visual_projection, 1)  # head unused


def measure(
    finetuned: str,
    out_dir: str | Path,
    *,
    reference: str | None = None,
    dataset: str | None = None,
    zeroshot: list[str] | None = None,
    overrides: list[str] | None = None,
    fmt: str = "auto",
    open_clip_model: str | None = None,
    name: str | None = None,
    recipe: str | None = None,
    seed: int | None = None,
    lr: float | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Measure ``finetuned`` against ``reference`` and write ``out_dir/record.json``.

    ``reference`` defaults to a run directory's own model (and is required otherwise), and
    ``seed`` and ``lr`` (the fine-tuning's, for grouping replicates and learning-rate tables)
    to a run's own (else 0 and unrecorded); ``fmt`` is ``auto`` or one of
    `attndrift.models.external.FORMATS`. Returns the record.

    Raises:
        ConfigError: bad settings; FileNotFoundError: missing file; ExternalModelError /
        ArchitectureMismatch: unknown format, unreadable or mismatching checkpoint.
    """
    from attndrift.config import ConfigError
    from attndrift.data.registry import load_task
    from attndrift.data.splits import balanced_subset
    from attndrift.evaluate import (
        accuracy,
        auxiliary_metrics,
        probe_attention,
        sanity_check,
        validation_probe_sets,
        zeroshot_all,
        zeroshot_summary,
    )
    from attndrift.models.clip import load_clip, resolve_source
    from attndrift.models.external import checkpoint_sha256, text_tower_changed
    from attndrift.phases import ATTENTION_SAMPLES, data_provenance, final_record
    from attndrift.probes.drift import vision_weight_snapshot
    from attndrift.probes.metrics import summarize
    from attndrift.records import RECORD_FILE, RunRecord, provenance, run_id_for, write_record
    from attndrift.runtime import save_weights, select_device
    from attndrift.zeroshot import text_classifier

    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    data, probe, precision, run_config = resolve_settings(
        finetuned, fmt, dataset, zeroshot, overrides
    )
    fmt = detect_format(finetuned) if fmt == "auto" else fmt
    if reference is None:
        if run_config is None:
            raise ConfigError("give --reference PRETRAINED (the model that was fine-tuned)")
        reference = str(run_config.get("model", "tiny"))
    if run_config is not None:  # a run knows its learning rate and seed
        lr = (run_config.get("train") or {}).get("lr") if lr is None else lr
        seed = run_config.get("seed") if seed is None else seed
    seed = 0 if seed is None else seed
    dev = select_device(device)

    # --- models -------------------------------------------------------------------------
    t = time.perf_counter()
    ref = load_clip(reference)
    ft = load_finetuned(finetuned, ref, fmt, open_clip_model)
    ref_model = _classifier(ref.model).to(dev)
    ft_model = ft.classifier.to(dev)
    ft.clip.to(dev)
    ref.model.to(dev)
    pre_ref = ref.preprocessor()
    pre_ft = type(pre_ref)(ref.image_size, ft.mean, ft.std)
    own_text = text_tower_changed(ft.clip, ref.model)

    # --- the probe set, exactly as a run builds it ---------------------------------------
    size = ref.image_size
    source = load_task(data.dataset, "train", image_size=size, progress=progress)
    train_idx, val_idx, val_set, subsets = validation_probe_sets(
        source, data.val_frac, data.split_seed, probe.images, probe.subsets, probe.seed
    )
    if data.train_limit is not None:
        train_idx = train_idx[
            balanced_subset(source.labels[train_idx], data.train_limit, data.split_seed)
        ]
    probe_images = val_set.images[subsets[0]]
    zs_tasks = {n: load_task(n, "test", image_size=size, progress=progress) for n in data.zeroshot}
    setup_s = time.perf_counter() - t

    def probe_of(model, preprocess, images):
        return probe_attention(
            model, images, preprocess, dev, probe.batch_size, probe.precision, on_device=True
        )

    def measured(model, preprocess) -> tuple[torch.Tensor, dict[str, Any]]:
        attn = probe_of(model, preprocess, probe_images)
        metrics = summarize(attn)
        metrics["subsets"] = [metrics["mean"]] + [
            summarize(probe_of(model, preprocess, val_set.images[s]))["mean"] for s in subsets[1:]
        ]
        return attn, metrics

    # --- attention probe and auxiliary metrics ------------------------------------------
    t = time.perf_counter()
    base_attn, baseline = measured(ref_model, pre_ref)
    final_attn, final_metrics = measured(ft_model, pre_ft)
    probe_s = time.perf_counter() - t
    t = time.perf_counter()
    which = list(probe.aux)
    baseline["aux"], aux_ref = auxiliary_metrics(
        ref_model, probe_images, pre_ref, dev, probe.batch_size, which, None, None, probe.precision
    )
    weights = vision_weight_snapshot(ref_model) if "drift" in which else None
    final_aux = auxiliary_metrics(
        ft_model,
        probe_images,
        pre_ft,
        dev,
        probe.batch_size,
        which,
        aux_ref,
        weights,
        probe.precision,
    )[0]
    aux_s = time.perf_counter() - t

    # --- zero-shot: each model through its own image encoder and text tower -------------
    t = time.perf_counter()
    bs = data.eval_batch_size
    ref_text = {
        n: text_classifier(ref.model, ref.tokenizer, k.class_names, k.templates, dev)
        for n, k in zs_tasks.items()
    }
    ft_text = {
        n: text_classifier(ft.clip, ft.tokenizer, k.class_names, k.templates, dev)
        for n, k in zs_tasks.items()
    }
    before = zeroshot_all(ref_model, ref_text, zs_tasks, pre_ref, dev, bs, precision)
    after = zeroshot_all(ft_model, ft_text, zs_tasks, pre_ft, dev, bs, precision)
    own = {
        "task": text_classifier(
            ref.model, ref.tokenizer, val_set.class_names, val_set.templates, dev
        )
    }
    own_acc = zeroshot_all(ref_model, own, {"task": val_set}, pre_ref, dev, bs, precision)["task"]
    zeroshot_s = time.perf_counter() - t

    # --- task accuracy, where the checkpoint has a head trained on this dataset ---------
    val_acc = test_acc = None
    head_note = "no classification head"
    if ft.has_head:
        same = (
            ft.details.get("dataset") == data.dataset
            and ft.details.get("classes") == source.num_classes
        )
        head_note = "the run's head" if same else "head trained on another dataset: not scored"
        if same:
            val_acc = accuracy(ft_model, val_set, pre_ft, dev, bs, precision)
            test_set = load_task(data.dataset, "test", image_size=size)  # read once
            test_acc = accuracy(ft_model, test_set, pre_ft, dev, bs, precision)

    # --- the record ---------------------------------------------------------------------
    label = name or (run_config or {}).get("name") or Path(finetuned.rstrip("/")).name
    config = {
        "name": label,
        "seed": seed,
        "model": reference,
        "method": "external",
        "external": {"format": fmt, "recipe": recipe or label},
        "data": data.model_dump(mode="json"),
        "probe": probe.model_dump(mode="json"),
        "train": {"precision": precision, **({"lr": lr} if lr is not None else {})},
        "device": device,
    }
    record = RunRecord(run_id_for({**config, "finetuned_sha256": ft.sha256}), config)
    ref_source = resolve_source(reference)
    weights_file = Path(ref_source) / "model.safetensors"  # what a run's model_sha256 hashes
    ref_sha = checkpoint_sha256(str(weights_file) if weights_file.is_file() else ref_source)
    record.provenance = provenance(str(dev))
    record.provenance.update(
        {
            "model_source": ref_source,
            "model_sha256": ref_sha,
            "reference": {"name": reference, "source": ref_source, "sha256": ref_sha},
            "finetuned": {
                "source": str(finetuned),
                "format": fmt,
                "sha256": ft.sha256,
                "text_tower": "fine-tuned" if own_text else "reference",
                "head": head_note,
                **ft.details,
            },
            "data": data_provenance(data.dataset, source, train_idx, val_idx, subsets),
            "zeroshot_data": {n: k.fingerprint() for n, k in zs_tasks.items()},
        }
    )
    record.sanity, record.warnings = sanity_check(
        {
            f"{data.dataset} (validation)": (own_acc, val_set.num_classes),
            **{n: (before[n], k.num_classes) for n, k in zs_tasks.items()},
        }
    )
    record.baseline = baseline
    final_subsets = final_metrics.pop("subsets")
    record.final = final_record(final_metrics, final_subsets, final_aux, baseline,
                                test_acc=test_acc, val_acc=val_acc, best_val_acc=val_acc)
    record.zeroshot = zeroshot_summary(before, after, zs_tasks)
    record.status = "completed"
    record.timing = {
        "setup_s": setup_s,
        "probe_s": probe_s,
        "aux_s": aux_s,
        "zeroshot_s": zeroshot_s,
        "total_s": time.perf_counter() - t_start,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(
        out_dir / "attention.safetensors",
        {
            "pretrained": base_attn[:ATTENTION_SAMPLES].cpu(),
            "final": final_attn[:ATTENTION_SAMPLES].cpu(),
            "labels": val_set.labels[subsets[0]][:ATTENTION_SAMPLES],
            "images": probe_images[:ATTENTION_SAMPLES],
        },
        {"run_id": record.run_id, "method": "external", "model": reference},
    )
    write_record(out_dir / RECORD_FILE, record)
    return record.to_json()
