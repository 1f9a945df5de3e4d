"""eval.checkpoint (issue 21 item 1): with ``best``, the best-validation epoch's weights are
restored before every final evaluation; with ``final`` (default) the last step's are measured,
and records and run ids are what they were before the key existed."""

import pytest
import torch

from attndrift.config import identity
from attndrift.records import run_id_for
from conftest import tiny_config

# 3 epochs of 2 steps, one zero-shot task: fast, and every final number is a real measurement
SHORT = ["train.epochs=3", "data.train_limit=64", "probe.per_epoch=1", "probe.subsets=2",
         "data.zeroshot=[shapes-zs-shape]"]


def _scripted_validation(monkeypatch, scores):
    """Validation accuracy at the epoch ends follows ``scores`` (which epoch is best is then
    known); every other accuracy (the test split) is measured for real."""
    import attndrift.train as train

    real, it = train.accuracy, iter(scores)

    def accuracy(model, task, *args, **kwargs):
        return next(it) if task.name.endswith("/val") else real(model, task, *args, **kwargs)

    monkeypatch.setattr(train, "accuracy", accuracy)


def _run(tmp_path, monkeypatch, name, scores, *overrides):
    from attndrift.train import run

    _scripted_validation(monkeypatch, scores)
    return run(tiny_config("tiny_full_ft", *SHORT, *overrides), tmp_path / name, progress=False)


def test_default_final_leaves_run_ids_and_settings_as_they_were():
    from attndrift.analysis.runs import setting_key

    dumped = tiny_config("tiny_full_ft").model_dump(mode="json")
    assert dumped["eval"] == {"checkpoint": "final"}
    before = {k: v for k, v in dumped.items() if k != "eval"}  # a config from before the key
    assert identity(dumped) == identity(before)  # so the run id is unchanged
    best = tiny_config("tiny_full_ft", "eval.checkpoint=best").model_dump(mode="json")
    assert identity(best)["eval"] == {"checkpoint": "best"}
    assert run_id_for(identity(best)) != run_id_for(identity(dumped))
    # records from before the key are replicates of the same setting; best is another one
    assert setting_key(before) == setting_key(dumped) != setting_key(best)


def test_best_checkpoint_is_restored_before_the_final_evaluation(tmp_path, monkeypatch):
    from attndrift.evaluate import probe_attention
    from attndrift.interpolate import interpolate_run
    from attndrift.models.restore import restore_run
    from attndrift.probes.metrics import summarize

    final = _run(tmp_path, monkeypatch, "final", [0.5, 0.9, 0.7])
    best = _run(tmp_path, monkeypatch, "best", [0.5, 0.9, 0.7], "eval.checkpoint=best")
    # training is the same; only what the final evaluation measured differs
    assert best["history"] == final["history"]
    assert final["final"]["evaluated"] == {"checkpoint": "final", "epoch": 3, "step": 6}
    assert best["final"]["evaluated"] == {"checkpoint": "best", "epoch": 2, "step": 4}
    assert best["final"]["best_epoch"] == final["final"]["best_epoch"] == 2
    assert best["final"]["val_acc"] == 0.9 and final["final"]["val_acc"] == 0.7
    for key in ("metrics", "delta_pct", "subsets"):
        assert best["final"][key] != final["final"][key], key
    assert [z["after"] for z in best["zeroshot"].values()] != \
           [z["after"] for z in final["zeroshot"].values()]
    # the final attention is the best epoch's: measured independently from best.safetensors
    loaded, adapted = restore_run(tmp_path / "best", "best")
    from attndrift.data.registry import load_task
    from attndrift.evaluate import run_probe_sets

    cfg = tiny_config("tiny_full_ft", *SHORT)
    source = load_task(cfg.data.dataset, "train", image_size=loaded.image_size)
    _, _, _, _, probe_set, subsets = run_probe_sets(
        source, cfg.data.val_frac, cfg.data.split_seed, cfg.probe.images, cfg.probe.subsets,
        cfg.probe.seed)
    attn = probe_attention(adapted.model, probe_set.images[subsets[0]], loaded.preprocessor(),
                           torch.device("cpu"), cfg.probe.batch_size)
    assert summarize(attn) == best["final"]["metrics"]
    # interpolation walks toward the weights the record measured: at alpha 1, its numbers
    (row,) = interpolate_run(tmp_path / "best", [1.0])["rows"]
    assert row["test_acc"] == pytest.approx(best["final"]["test_acc"], abs=1e-12)
    assert row["metrics"]["mean"] == pytest.approx(best["final"]["metrics"]["mean"], rel=1e-9)
    # measuring the run directory measures the same weights as its record
    from attndrift.measure import measure

    measured = measure(str(tmp_path / "best"), tmp_path / "measured")
    assert measured["provenance"]["finetuned"]["checkpoint"] == "best"
    assert measured["final"]["test_acc"] == pytest.approx(best["final"]["test_acc"], abs=1e-12)
    assert measured["final"]["metrics"]["mean"] == pytest.approx(
        best["final"]["metrics"]["mean"], rel=1e-6)


def test_best_and_final_agree_when_the_best_epoch_is_the_last(tmp_path, monkeypatch):
    final = _run(tmp_path, monkeypatch, "final", [0.5, 0.6, 0.7])
    best = _run(tmp_path, monkeypatch, "best", [0.5, 0.6, 0.7], "eval.checkpoint=best")
    assert best["final"]["evaluated"] == {"checkpoint": "best", "epoch": 3, "step": 6}
    best["final"].pop("evaluated"), final["final"].pop("evaluated")
    assert best["final"] == final["final"]
    assert best["zeroshot"] == final["zeroshot"]
