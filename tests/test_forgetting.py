"""Forgetting during training: zero-shot on fixed subsets in the history, its analysis, the
report section."""

import math

import pytest
import torch

from attndrift.analysis.forgetting import (
    early_drift,
    early_drift_vs_retention,
    entropy_trajectory,
    forgetting_dynamics,
    retention_trajectory,
)
from attndrift.analysis.runs import Run, load_run
from attndrift.train import run
from conftest import tiny_config

TRACK = ["probe.zeroshot_every=2", "probe.zeroshot_images=50", "probe.subsets=1",
         "probe.aux=[]", "data.zeroshot=[shapes-zs-shape]"]


def test_a_tiny_run_tracks_zero_shot_on_a_fixed_subset(tmp_path):
    from attndrift.data.registry import load_task
    from attndrift.data.splits import balanced_subset
    from attndrift.models.restore import restore_run
    from attndrift.zeroshot import text_classifier, zeroshot_accuracy

    cfg = tiny_config("tiny_full_ft", *TRACK)
    out = tmp_path / "store" / "r"
    rec = run(cfg, out, progress=False)
    probes = rec["history"]["probes"]
    assert [p["step"] for p in probes] == [3, 7, 10]
    # every 2nd probe, and the last one
    assert ["zeroshot" in p for p in probes] == [False, True, True]
    assert set(rec["baseline"]["zeroshot_subset"]) == {"shapes-zs-shape"}
    assert rec["provenance"]["zeroshot_subsets"]["shapes-zs-shape"]["images"] == 50
    # the last point is the final model on the 50 class-balanced images, computed here anew
    task = load_task("shapes-zs-shape", "test")
    sub = task.subset(balanced_subset(task.labels, 50, cfg.probe.seed))
    counts = torch.bincount(sub.labels, minlength=task.num_classes)
    assert len(sub) == 50 and int(counts.max() - counts.min()) <= 1  # class-balanced
    loaded, adapted = restore_run(out)
    weights = text_classifier(loaded.model, loaded.tokenizer, task.class_names, task.templates)
    acc = zeroshot_accuracy(adapted.model.embed, weights, sub, loaded.preprocessor())
    assert probes[-1]["zeroshot"]["shapes-zs-shape"] == pytest.approx(acc, abs=1e-9)

    # analysis: retention is relative to the same subset's pretrained accuracy
    xs, ys = retention_trajectory(rec, "shapes-zs-shape")
    base = rec["baseline"]["zeroshot_subset"]["shapes-zs-shape"]
    assert xs.tolist() == [0.0, 0.7, 1.0] and ys[0] == 100.0
    assert ys[-1] == pytest.approx(100 * acc / base)
    table = forgetting_dynamics([load_run(out)])
    assert len(table.rows) == 1 and table.rows[0]["ret_1"] == pytest.approx(ys[-1])
    assert table.rows[0]["dh_1"] == pytest.approx(rec["final"]["delta_pct"]["entropy"])

    # the report renders the section (table and figure)
    from attndrift.report.build import build_report

    result = build_report(tmp_path / "store", tmp_path / "report")
    assert "forgetting" in result.figures and "forgetting_dynamics" in result.tables
    md = result.markdown.read_text()
    assert "Forgetting during training" in md


def _record(lr: float, seed: int, early_entropy: float, retention: float) -> dict:
    """A minimal completed record: entropy 1.0 at the start, ``early_entropy`` at 10% and 20%
    of training, final zero-shot retention ``retention`` %."""
    probe = lambda f, h: {"fraction": f, "metrics": {"mean": {"entropy": h}},  # noqa: E731
                          "zeroshot": {"t": 0.5}}
    return {"status": "completed",
            "config": {"name": "x", "seed": seed, "model": "tiny", "method": "full_ft",
                       "train": {"lr": lr}, "data": {"dataset": "d", "zeroshot": ["t"]},
                       "regularizer": {"name": "none"}},
            "baseline": {"mean": {"entropy": 1.0}, "zeroshot_subset": {"t": 0.8}},
            "history": {"probes": [probe(0.1, early_entropy), probe(0.2, early_entropy),
                                   probe(1.0, 0.5)]},
            "zeroshot": {"t": {"retention_pct": retention}}}


def _runs(records) -> list[Run]:
    return [Run(None, f"r{i}", "completed", None, r) for i, r in enumerate(records)]


def test_early_drift_and_trajectories_closed_form():
    rec = _record(1e-3, 0, 0.9, 40.0)
    assert early_drift(rec) == pytest.approx(-10.0)  # mean of the probes at 10% and 20%
    xs, ys = entropy_trajectory(rec)
    assert xs.tolist() == [0.0, 0.1, 0.2, 1.0] and ys.tolist() == pytest.approx(
        [0.0, -10.0, -10.0, -50.0])
    assert retention_trajectory(rec, "t")[1].tolist() == pytest.approx([100, 62.5, 62.5, 62.5])


def test_early_drift_vs_retention_is_spearman_with_exact_permutation_p():
    # four settings (learning rates), one seed each: more early drift, less retention
    settings = [_record(lr, 0, h, ret) for lr, h, ret in
                ((1e-4, 0.99, 90.0), (3e-4, 0.95, 70.0), (1e-3, 0.9, 60.0), (3e-3, 0.8, 20.0))]
    # three seeds of one more setting, ranks reversed in one pair
    seeds = [_record(1e-2, s, h, ret) for s, h, ret in ((0, 0.7, 10.0), (1, 0.6, 12.0),
                                                        (2, 0.5, 11.0))]
    table = early_drift_vs_retention(_runs(settings + seeds))
    across = [r for r in table.rows if r["unit"] == "settings (seed means)"]
    within = [r for r in table.rows if r["unit"] == "seeds of this setting"]
    assert len(across) == 1 and len(within) == 1
    # across 5 settings (the seeded one as its mean): drifts -1, -5, -10, -20, -40 %,
    # retentions 90, 70, 60, 20, 11: perfectly concordant ranks -> rho = 1; exact p = 2/120
    assert across[0]["n"] == 5 and across[0]["rho"] == pytest.approx(1.0)
    assert across[0]["p"] == pytest.approx(2 / 120)
    assert "exact" in across[0]["test"]
    # within the seeded setting: drifts -30, -40, -50 % vs retention 10, 12, 11, ranks
    # (3, 2, 1) vs (1, 3, 2): rho = -0.5; p = share of the 3! pairings with |rho| >= 0.5
    x, y = [3, 2, 1], [1, 3, 2]
    assert within[0]["rho"] == pytest.approx(-0.5)
    import itertools

    def rho(a, b):
        n = len(a)
        return 1 - 6 * sum((p - q) ** 2 for p, q in zip(a, b, strict=True)) / (n * (n * n - 1))

    null = [rho(x, [y[i] for i in perm]) for perm in itertools.permutations(range(3))]
    expected = sum(abs(v) >= 0.5 - 1e-12 for v in null) / len(null)
    assert within[0]["p"] == pytest.approx(expected)
    assert not math.isnan(across[0]["rho"])


def test_a_resumed_run_tracks_zero_shot_as_an_uninterrupted_one(tmp_path, monkeypatch):
    import attndrift.train as train

    cfg = tiny_config("tiny_full_ft", *TRACK, "train.epochs=2", "train.checkpoint_minutes=0",
                      "probe.zeroshot_every=1", "save_checkpoints=false")
    ref = run(cfg, tmp_path / "ref", progress=False)
    real, calls = train.accuracy, {"n": 0}

    def crash_at_second_epoch_end(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "accuracy", crash_at_second_epoch_end)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(train, "accuracy", real)
    resumed = run(cfg, tmp_path / "cut", progress=False)
    assert resumed["timing"]["resumed"] == 1
    assert sum("zeroshot" in p for p in resumed["history"]["probes"]) == 6
    for key in ("baseline", "history", "final", "zeroshot"):
        assert resumed[key] == ref[key], key
