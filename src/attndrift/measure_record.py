"""The record of one measurement (`attndrift.measure`): the run schema with method
``external``, provenance naming both checkpoints, and what came from where.

``provenance.finetuned`` says which text tower scored zero-shot (``text_tower``), which parts
of the scored model were not in the checkpoint and came from the reference
(``from_reference``), what was left out (``ignored``: a head the reference has no place for)
and the head; loader warnings (an adapter naming another base model) join ``warnings``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attndrift.signals import ATTENTION_SAMPLES  # as a run saves them

ATTENTION_FILE = "attention.safetensors"


def _reference_provenance(reference: str) -> dict[str, Any]:
    from attndrift.models.clip import resolve_source
    from attndrift.models.weights import checkpoint_sha256

    source = resolve_source(reference)
    weights_file = Path(source) / "model.safetensors"  # what a run's model_sha256 hashes
    sha = checkpoint_sha256(str(weights_file) if weights_file.is_file() else source)
    return {"model_source": source, "model_sha256": sha,
            "reference": {"name": reference, "source": source, "sha256": sha}}


def _finetuned_provenance(s: Any, head: str) -> tuple[dict[str, Any], list[str]]:
    from attndrift.models.external import text_tower_changed

    details = dict(s.ft.details)
    warnings = list(details.pop("warnings", None) or [])
    own_text = text_tower_changed(s.ft.clip, s.ref.model)
    return {
        "source": str(s.plan.finetuned),
        "format": s.plan.fmt,
        "sha256": s.ft.sha256,
        "text_tower": "fine-tuned" if own_text else "reference",
        "from_reference": details.pop("from_reference", None) or [],
        "head": head,
        **details,
    }, warnings


def _data_provenance(s: Any) -> dict[str, Any]:
    from attndrift.phases import data_provenance  # as a run records it

    split, budget = s.split, s.plan.data.budget
    return data_provenance(s.plan.data.dataset, s.source, split.train_idx, split.val_idx,
                           split.subsets, split.pool_idx,
                           budget.model_dump() if budget else None)


def assemble(s: Any, results: dict[str, Any]) -> dict[str, Any]:
    """The completed record of measurement state ``s`` and phase ``results``."""
    from attndrift.evaluate import sanity_check, zeroshot_summary
    from attndrift.phases import final_record
    from attndrift.records import RunRecord, provenance

    plan = s.plan
    record = RunRecord(plan.run_id, plan.config)  # the typed record a run writes too
    finetuned, loader_warnings = _finetuned_provenance(s, results["head"])
    record["provenance"] = provenance(str(s.dev))
    record["provenance"].update(_reference_provenance(plan.reference))
    record["provenance"].update({
        "finetuned": finetuned,
        "data": _data_provenance(s),
        "zeroshot_data": {n: k.fingerprint() for n, k in s.zs_tasks.items()},
    })
    before, after, own_acc = results["zeroshot"]
    record["sanity"], warnings = sanity_check({
        f"{plan.data.dataset} (validation)": (own_acc, s.split.val_set.num_classes),
        **{n: (before[n]["top1"], k.num_classes) for n, k in s.zs_tasks.items()},
    })
    record["warnings"] = loader_warnings + warnings
    record["baseline"] = results["baseline"]
    final_metrics = results["final"]
    final_subsets = final_metrics.pop("subsets")
    val_acc, test_acc = results["task"]
    # no training here: step, epochs, best epoch and loss stay None
    record.final = final_record(final_metrics, final_subsets, results["final_aux"],
                                results["baseline"], test_acc=test_acc, val_acc=val_acc,
                                best_val_acc=val_acc)
    record["zeroshot"] = zeroshot_summary(before, after, s.zs_tasks, s.zs_prompts)
    record["status"] = "completed"
    return record.to_json()


def write_outputs(out_dir: Path, record: dict[str, Any], s: Any,
                  results: dict[str, Any]) -> None:
    """``attention.safetensors`` (the first probe images' maps, for the report's heatmaps),
    then ``record.json`` last: a directory with a record holds a finished measurement."""
    from attndrift.records import RECORD_FILE, write_record
    from attndrift.runtime import save_weights

    n = ATTENTION_SAMPLES
    subsets = s.split.subsets
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(
        out_dir / ATTENTION_FILE,
        {
            "pretrained": results["base_attn"][:n].cpu(),
            "final": results["final_attn"][:n].cpu(),
            "labels": s.split.probe_set.labels[subsets[0]][:n],
            "images": s.probe_images[:n],
        },
        {"run_id": record["run_id"], "method": "external", "model": s.plan.reference},
    )
    write_record(out_dir / RECORD_FILE, record)
