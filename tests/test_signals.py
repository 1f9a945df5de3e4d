"""The signal spec (attndrift.signals): its integrity, the one drift formula, reading a signal from
a record, and that every registered signal reaches the record, the tables and `compare`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from attndrift.signals import (
    ATTENTION,
    PREDICTORS,
    SIGNALS,
    change_score,
    drift_pct,
    final_probe,
    read_signal,
    signals_of,
)

ROOT = Path(__file__).resolve().parents[1]


def test_drift_pct_is_the_studys_formula_and_nan_where_undefined():
    assert drift_pct(1.1, 1.0) == pytest.approx(10.0, abs=1e-12)
    assert drift_pct(2.0, 4.0) == -50.0
    assert drift_pct(3, 2) == 50.0  # ints too
    # a relative change from 0 has no size: NaN (not ±inf), whatever the adapted value
    for adapted in (1.0, -1.0, 0.0):
        assert math.isnan(drift_pct(adapted, 0.0))
    for a, b in ((None, 1.0), (1.0, None), (math.nan, 1.0), (1.0, math.inf), ("1", 1.0)):
        assert math.isnan(drift_pct(a, b))


def test_the_probes_and_the_analysis_use_the_same_drift_function():
    from attndrift.analysis import onset
    from attndrift.probes import metrics

    assert metrics.delta_pct is drift_pct and onset.drift_pct is drift_pct


def test_every_signal_is_fully_declared():
    assert set(SIGNALS) == set(ATTENTION) | set(signals_of("aux")) | set(signals_of("derived"))
    for name, s in SIGNALS.items():
        assert s.name == name and s.label and s.short and s.meaning, name
        assert s.change in ("higher", "lower", "away", None), name
        assert s.better in ("higher", "lower", None), name
        assert s.change is not None, f"{name} has no direction"
        assert s.needs in ("attention", "cka", "drift", "rollout", "zeroshot", "loss", "epochs",
                           "config", "end"), name
        assert s.drift in ("relative", "none"), name
    for name, s in ATTENTION.items():
        assert s.kind == "attention" and s.drift == "relative" and "higher" in s.meaning, name
        assert s.collapse in ("higher", "lower") and s.change == "away", name
        assert SIGNALS[f"d_{name}"].change == s.collapse, name
        # each attention metric is a predictor, signed and absolute (issue 23 item 1)
        assert {f"d_{name}", f"abs_d_{name}"} <= set(PREDICTORS)
    assert set(PREDICTORS) <= set(SIGNALS) and len(set(PREDICTORS)) == len(PREDICTORS)
    with pytest.raises(AttributeError):
        SIGNALS["entropy"].unit = "bits"  # type: ignore[misc]


def test_the_spec_and_its_display_views_import_without_torch():
    code = ("import sys, attndrift.signals, attndrift.analysis.metadata, attndrift.compare; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "False"


def test_metadata_is_a_view_of_the_spec_not_a_copy():
    from attndrift.analysis.metadata import AUX, SHORT, core_metrics, metric_info

    assert core_metrics() == tuple(ATTENTION) and list(metric_info()) == list(ATTENTION)
    assert all(metric_info()[m] is ATTENTION[m] for m in ATTENTION)
    assert {m: s.short for m, s in ATTENTION.items()} == SHORT
    assert AUX["cka_cls"] == (SIGNALS["cka_cls"].label, SIGNALS["cka_cls"].meaning)


def _record() -> dict:
    base = {"entropy": {"layers": [2.0, 4.0], "heads": [[2.0], [4.0]]}, "mean": {"entropy": 3.0}}
    probe = {"step": 7, "fraction": 0.5,
             "metrics": {"entropy": {"layers": [1.0, 5.0]}, "mean": {"entropy": 2.4}},
             "aux": {"cka_cls": [1.0, 0.5, 0.3], "embedding_drift": 0.25},
             "zeroshot": {"a": 0.3, "b": 0.0}}
    return {"baseline": {**base, "zeroshot_subset": {"a": 0.6, "b": 0.0}},
            "history": {"probes": [probe],
                        "loss": [{"step": 5, "loss": 2.0}, {"step": 7, "loss": 1.5},
                                 {"step": 9, "loss": 1.0}],
                        "epochs": [{"epoch": 1, "step": 4, "val_acc": 0.4},
                                   {"epoch": 2, "step": 8, "val_acc": 0.7}]},
            "final": {"aux": {"cka_cls": [0.9], "subset_cv": {}}}}


def test_read_signal_from_a_probe_entry():
    rec = _record()
    p = rec["history"]["probes"][0]
    assert read_signal(rec, p, "entropy") == 2.4
    assert read_signal(rec, p, "d_entropy") == pytest.approx(100 * (2.4 - 3.0) / 3.0)
    assert read_signal(rec, p, "abs_d_entropy") == pytest.approx(20.0)
    assert read_signal(rec, p, "d_entropy_last") == pytest.approx(25.0)
    assert read_signal(rec, p, "abs_d_entropy_last") == pytest.approx(25.0)
    assert read_signal(rec, p, "cka_mean") == pytest.approx(0.6)
    assert read_signal(rec, p, "cka_last") == pytest.approx(0.3)
    assert read_signal(rec, p, "embedding_drift") == 0.25
    assert read_signal(rec, p, "train_loss") == 1.5  # the last log at or before step 7
    assert read_signal(rec, p, "val_acc") == 0.4  # epoch 2 ended at step 8, after the probe
    assert read_signal(rec, p, "zeroshot_track", task="a") == pytest.approx(50.0)
    rec["baseline"]["zeroshot_subset"]["b"], p["zeroshot"]["b"] = 0.5, 0.4
    assert read_signal(rec, p, "zeroshot_track") == pytest.approx(50.0)  # the lowest of a, b
    assert read_signal(rec, p, "zeroshot_track", task="b") == pytest.approx(80.0)
    rec["baseline"]["zeroshot_subset"]["b"], p["zeroshot"]["b"] = 0.0, 0.0
    rec["config"] = {"train": {"lr": 1e-3}}
    assert read_signal(rec, p, "log_lr") == pytest.approx(-3.0)
    # not measured, or undefined: NaN, never a made-up number
    assert math.isnan(read_signal(rec, p, "weight_drift"))
    assert math.isnan(read_signal(rec, p, "d_erf"))
    assert math.isnan(read_signal(rec, p, "zeroshot_track", task="b"))  # pretrained 0
    assert math.isnan(read_signal(rec, p, "zeroshot_track", task="c"))
    assert math.isnan(read_signal(rec, p, "test_acc"))  # only at the end
    with pytest.raises(KeyError):
        read_signal(rec, p, "no_such_signal")


def test_final_probe_is_the_last_probe_with_the_final_aux_and_test_accuracy():
    rec = _record()
    rec["final"]["test_acc"] = 0.75
    last = final_probe(rec)
    assert last["aux"]["cka_cls"] == [0.9] and last["aux"]["embedding_drift"] == 0.25
    assert "subset_cv" not in last["aux"] and read_signal(rec, last, "cka_last") == 0.9
    assert read_signal(rec, last, "test_acc") == 0.75 and last["step"] == 7
    assert rec["history"]["probes"][0]["aux"]["cka_cls"] == [1.0, 0.5, 0.3]  # not modified


def test_change_score_orients_every_signal_so_higher_means_more_change():
    assert change_score("cka_mean", 0.9) == -0.9
    assert change_score("embedding_drift", 0.2) == 0.2
    assert change_score("d_entropy", -7.0) == 7.0
    assert change_score("d_gini", 7.0) == 7.0  # Gini rises as attention collapses
    assert change_score("zeroshot_track", 80.0) == -80.0
    assert math.isnan(change_score("entropy", 3.0))  # a raw metric: read its drift


# --- every registered signal reaches the record, the tables and compare (STYLE #16) -----------


def test_every_attention_signal_is_in_the_record_tables_and_compare(lora_run):
    from attndrift.analysis import all_tables
    from attndrift.analysis.runs import load_run
    from attndrift.compare import comparison_tables

    rec = json.loads((lora_run / "record.json").read_text())
    fin, tables = rec["final"], {t.name: t for t in all_tables([load_run(lora_run)])}
    columns = [c.header for t in comparison_tables([rec]) for c in t.columns]
    layers = len(rec["baseline"]["entropy"]["layers"])
    for name, s in ATTENTION.items():
        for where in (rec["baseline"], fin["metrics"], rec["history"]["probes"][0]["metrics"]):
            assert len(where[name]["layers"]) == layers and name in where["mean"], name
            assert ("heads" in where[name]) == s.per_head, name
        for key in ("delta_pct", "delta_pct_subset_mean"):
            assert math.isfinite(fin[key][name]), (key, name)
        assert len(fin["delta_pct_layers"][name]) == layers, name
        main = tables["main_comparison"]
        assert math.isfinite(main.rows[0][f"d_{name}"]), name
        assert f"d_{name}" in [c.key for c in main.columns], name
        assert math.isfinite(tables["absolute_metrics"].rows[0][f"{name}_f"]), name
        assert f"Δ {s.short}" in columns, name


def test_every_predictor_signal_is_read_from_a_real_record(lora_run):
    """With the default probe settings every predictor is tracked at least once per epoch: the
    auxiliary metrics and the zero-shot track at each epoch's last probe."""
    rec = json.loads((lora_run / "record.json").read_text())
    last, tasks = final_probe(rec), list(rec["zeroshot"])
    per_epoch = rec["config"]["probe"]["per_epoch"]
    assert rec["config"]["probe"]["aux_every"] is None  # the default: once per epoch
    for i, probe in enumerate(rec["history"]["probes"], start=1):
        tracked = i % per_epoch == 0
        assert ("aux" in probe) == tracked and ("zeroshot" in probe) == tracked, i
    for name in PREDICTORS:
        s = SIGNALS[name]
        values = [read_signal(rec, last, name, task=t) for t in tasks] if s.per_task else [
            read_signal(rec, last, name)]
        assert all(math.isfinite(v) for v in values), name
        epoch_end = rec["history"]["probes"][per_epoch - 1]
        assert math.isfinite(read_signal(rec, epoch_end, name, task=tasks[0])) or name == "test_acc"
