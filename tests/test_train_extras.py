"""The training loop's regularizers, auxiliary metrics and probe precision, end to end
(TensorBoard and the other trackers: test_trackers.py)."""

import pytest

from attndrift.signals import ATTENTION, signals_of
from attndrift.train import run
from conftest import tiny_config

SHORT = ["train.max_steps=6", "train.log_every=1", "probe.per_epoch=2", "probe.subsets=2",
         "save_checkpoints=false", "data.zeroshot=[shapes-zs-shape]"]


def test_apr_is_zero_before_the_first_update_and_positive_after(tmp_path):
    rec = run(tiny_config("tiny_full_ft", *SHORT, "regularizer.name=apr", "regularizer.lam=0.1"),
              tmp_path, progress=False)
    reg = [e["reg"] for e in rec["history"]["loss"]]
    # step 1's penalty is computed before any update: current == cached pretrained attention
    # (up to the cache's float16 rounding)
    assert reg[0] < 1e-4
    assert max(reg[1:]) > 10 * max(reg[0], 1e-6)
    assert rec["timing"]["apr_cache_s"] > 0 and rec["timing"]["apr_cache_mb"] > 0


def test_entropy_floor_acts_at_the_studys_setting(tmp_path):
    # The study's R2 (ratio 0.7, lambda 0.1) is a hinge per (image, head) map: on the tiny CLIP
    # a third of the maps lie below 0.7 x their layer's pretrained entropy at step 0, so the
    # penalty is positive from the first step and the run differs from the unregularized one
    # (a hinge on the layer mean was 0 throughout and the two runs were bit-identical).
    ef = ["regularizer.name=entropy_floor", "regularizer.lam=0.1"]
    plain = run(tiny_config("tiny_full_ft", *SHORT), tmp_path / "none", progress=False)
    floor = run(tiny_config("tiny_full_ft", *SHORT, *ef, "regularizer.ratio=0.7"),
                tmp_path / "ef", progress=False)
    assert floor["baseline"] == plain["baseline"]
    reg = [e["reg"] for e in floor["history"]["loss"]]
    assert reg[0] > 0.1
    assert floor["history"]["loss"][1]["loss"] != plain["history"]["loss"][1]["loss"]
    assert floor["final"]["metrics"]["mean"] != plain["final"]["metrics"]["mean"]


def test_l2sp_grows_from_zero(tmp_path):
    rec = run(tiny_config("tiny_lora", *SHORT, "regularizer.name=l2sp", "regularizer.lam=0.01"),
              tmp_path, progress=False)
    reg = [e["reg"] for e in rec["history"]["loss"]]
    assert reg[0] == 0.0 and reg[-1] > 0


def test_auxiliary_metrics_are_recorded(tmp_path):
    rec = run(tiny_config("tiny_lora", *SHORT, "probe.aux_every=1"), tmp_path, progress=False)
    base, final = rec["baseline"]["aux"], rec["final"]["aux"]
    # before training: what needs no reference (rollout, patch-to-patch), every such signal
    assert set(base) == {n for n, s in signals_of("aux").items() if s.needs == "rollout"}
    assert set(final) - {"subset_cv"} == set(signals_of("aux"))  # every declared aux signal
    layers = len(rec["baseline"]["entropy"]["layers"])
    for key in ("cka_cls", "cka_patch", "weight_drift_layers", "p2p_entropy_layers",
                "p2p_distance_layers"):
        assert len(final[key]) == layers
    assert all(0 < c <= 1 + 1e-6 for c in final["cka_cls"] + final["cka_patch"])
    assert final["weight_drift"] > 0 and final["embedding_drift"] > 0
    assert set(final["subset_cv"]) == set(ATTENTION)
    assert all("aux" in p for p in rec["history"]["probes"])


def test_bf16_probes_are_close_to_fp32_but_really_bf16(tmp_path):
    """probe.precision=bf16 runs the probe and auxiliary forwards under bf16 autocast: the
    metrics move a little (so autocast is really on) and stay close to fp32."""
    recs = {p: run(tiny_config("tiny_lora", *SHORT, f"probe.precision={p}"), tmp_path / p,
                   progress=False) for p in ("fp32", "bf16")}
    fp32, bf16 = (recs[p]["baseline"] for p in ("fp32", "bf16"))
    assert fp32["mean"] != bf16["mean"]
    for m in ("entropy", "erf", "gini", "head_diversity"):
        assert bf16["mean"][m] == pytest.approx(fp32["mean"][m], rel=2e-2, abs=1e-3), m
    assert bf16["aux"]["rollout_entropy"] != fp32["aux"]["rollout_entropy"]
    assert bf16["aux"]["rollout_entropy"] == pytest.approx(fp32["aux"]["rollout_entropy"],
                                                           rel=2e-2)
    # training itself does not depend on the probe precision
    assert [e["loss"] for e in recs["bf16"]["history"]["loss"]] == \
        [e["loss"] for e in recs["fp32"]["history"]["loss"]]
