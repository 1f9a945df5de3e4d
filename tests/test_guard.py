"""The early-warning guard (attndrift.guard): crossing rules, config checks, and a tiny run
that stops at the first probe where its signal crosses and is never trained past it on resume."""

from __future__ import annotations

import pytest
from tests.conftest import tiny_config

import attndrift.train as train
from attndrift.config import ConfigError
from attndrift.guard import Guard, describe
from attndrift.records import read_record
from attndrift.tracked import value_at_probe


def _record(entropies: list[float]) -> tuple[dict, list[dict]]:
    base = {"mean": {"entropy": 2.0}}
    probes = [{"step": i + 1, "epoch": (i + 1) / 4, "fraction": (i + 1) / len(entropies),
               "metrics": {"mean": {"entropy": e}}} for i, e in enumerate(entropies)]
    return {"baseline": base, "history": {"probes": probes, "loss": [], "epochs": []}}, probes


def test_stop_at_first_crossing_in_the_direction_of_more_change():
    record, probes = _record([1.99, 1.9, 1.7, 1.95])  # Δ entropy -0.5, -5, -15, -2.5 %
    guard = Guard("d_entropy", threshold=-4.0, action="stop")
    assert guard.direction == "below"  # lower entropy = collapse
    hits = [guard.check(record, p) for p in probes]
    assert [h is not None for h in hits] == [False, True, False, False]  # stops at the first
    assert guard.should_stop and guard.stopped["step"] == 2
    assert guard.stopped["value"] == pytest.approx(-5.0)
    assert "Δ entropy = -5 went below -4 at step 2 (epoch 0.50, 50% of training)" in describe(
        guard.stopped)


def test_warn_records_every_crossing_and_start_delays_checking():
    record, probes = _record([1.9, 1.9, 1.7, 1.95])
    guard = Guard("abs_d_entropy", threshold=4.0, action="warn", start=0.5)
    with pytest.warns(UserWarning, match="guard warning"):
        for p in probes:
            guard.check(record, p)
    assert [c["step"] for c in guard.crossings] == [2, 3]  # step 1 is before start
    assert not guard.should_stop
    above = Guard("d_entropy", threshold=-1.0, direction="above", action="stop")
    assert [above.crossed(value_at_probe(record, "d_entropy", p)) for p in probes] == [
        False, False, False, False]


def test_guard_config_is_checked():
    with pytest.raises(ConfigError, match=r"needs guard\.threshold"):
        tiny_config("tiny_full_ft", "guard.signal=abs_d_entropy")
    with pytest.raises(ConfigError, match="unknown signal 'cka'"):
        tiny_config("tiny_full_ft", "guard.signal=cka", "guard.threshold=0.9")
    # tracked once per epoch by default; refused where tracking is turned off
    with pytest.raises(ConfigError, match=r"probe\.aux_every > 0"):
        tiny_config("tiny_full_ft", "guard.signal=cka_mean", "guard.threshold=0.9",
                    "probe.aux_every=0")
    with pytest.raises(ConfigError, match=r"probe\.zeroshot_every > 0"):
        tiny_config("tiny_full_ft", "guard.signal=zeroshot_track", "guard.threshold=50",
                    "probe.zeroshot_every=0")
    assert tiny_config("tiny_full_ft", "guard.signal=zeroshot_track",
                       "guard.threshold=50").guard.signal == "zeroshot_track"
    with pytest.raises(ConfigError, match="only at the end"):
        tiny_config("tiny_full_ft", "guard.signal=test_acc", "guard.threshold=0.5")
    cfg = tiny_config("tiny_full_ft", "guard.signal=cka_mean", "guard.threshold=0.9",
                      "probe.aux_every=1")
    assert cfg.guard.action == "warn"


def test_tiny_run_stops_at_the_first_crossing_and_resumes_without_training_past_it(
        full_ft_run, tmp_path, monkeypatch):
    """The guarded run follows the unguarded one (same config, CPU-deterministic) up to the
    first probe where Δ entropy crosses, stops there, and a resume after an interrupt in its
    final evaluation does not train further."""
    plain = read_record(full_ft_run)
    probes = plain["history"]["probes"]
    values = [value_at_probe(plain, "d_entropy", p) for p in probes]
    assert len(values) == 3
    # a threshold the first probe does not cross and the second does
    direction = "above" if values[1] > values[0] else "below"
    threshold = (values[0] + values[1]) / 2
    guard = ["guard.signal=d_entropy", f"guard.threshold={threshold!r}",
             f"guard.direction={direction}", "guard.action=stop"]
    real_final = train._final_evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_final_evaluation", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.run(tiny_config("tiny_full_ft", *guard), tmp_path, progress=False)
    assert read_record(tmp_path)["status"] == "interrupted"
    assert (tmp_path / "resume.pt").is_file()
    monkeypatch.setattr(train, "_final_evaluation", real_final)
    rec = train.run(tiny_config("tiny_full_ft", *guard), tmp_path, progress=False)

    stop_step = probes[1]["step"]
    assert rec["status"] == "completed" and rec["timing"]["resumed"] == 1
    assert rec["guard"]["stopped"]["step"] == stop_step < plain["final"]["step"]
    assert rec["guard"]["stopped"]["value"] == pytest.approx(values[1], rel=1e-6)
    assert len(rec["guard"]["crossings"]) == 1
    assert [p["step"] for p in rec["history"]["probes"]] == [p["step"] for p in probes[:2]]
    assert rec["final"]["step"] == stop_step  # evaluated where it stopped, not trained on
    assert rec["final"]["delta_pct"]["entropy"] == pytest.approx(values[1], rel=1e-6)
    assert (tmp_path / "final.safetensors").is_file() and not (tmp_path / "resume.pt").exists()
    # the report lists it, and leaves it out of the predictor ranking
    from attndrift.analysis import load_run
    from attndrift.analysis.frontier import guarded_runs
    from attndrift.analysis.predictors import samples

    table = guarded_runs([load_run(tmp_path), load_run(full_ft_run)])
    (row,) = table.rows
    assert row["stopped"] == "yes" and row["step"] == stop_step and row["signal"] == "Δ entropy"
    assert samples([load_run(tmp_path)]) == []
