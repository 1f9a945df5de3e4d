"""Experiment trackers (`attndrift.trackers`): TensorBoard, W&B and MLflow get the same
scalars from a real tiny run; one that is not installed is skipped with a warning."""

import dataclasses
import math
from pathlib import Path

import pytest

from attndrift import trackers
from attndrift.config import ConfigError
from attndrift.train import run
from conftest import tiny_config

SHORT = ["train.max_steps=6", "train.log_every=1", "probe.per_epoch=2", "probe.subsets=2",
         "save_checkpoints=false", "data.zeroshot=[shapes-zs-shape]", "probe.aux=[]"]


def _tensorboard(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_tensorboard_and_mlflow_get_the_same_scalars(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    # a local file store: no server and no database (MLflow >= 3.7 asks for the opt-in)
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "attndrift-test")
    rec = run(tiny_config("tiny_full_ft", *SHORT, "trackers=[mlflow]", "tensorboard=true"),
              tmp_path / "run", progress=False)
    board = _tensorboard(tmp_path / "run")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("attndrift-test")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["attndrift.run_id"] == rec["run_id"]
    assert mlrun.data.params["train.max_steps"] == "6"
    assert set(mlrun.data.metrics) == set(board)
    assert {"train/loss", "train/lr", "val/accuracy", "attention/entropy",
            "attention/entropy_delta_pct", "attention_layers/entropy/L1",
            "zeroshot_subset/shapes-zs-shape", "zeroshot/shapes-zs-shape",
            "test/accuracy"} <= set(board)
    for tag, points in board.items():
        logged = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id,
                                                                             tag))
        assert [s for s, _ in logged] == [s for s, _ in sorted(points)], tag
        # TensorBoard keeps float32
        assert [v for _, v in logged] == pytest.approx([v for _, v in sorted(points)],
                                                       rel=1e-6), tag
    # the values are the record's
    losses = [(e["step"], e["loss"]) for e in rec["history"]["loss"]]
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in losses] == board["train/loss"]
    assert board["test/accuracy"][0][1] == pytest.approx(rec["final"]["test_acc"], rel=1e-6)


def test_wandb_offline_run_holds_every_scalar(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    rec = run(tiny_config("tiny_full_ft", *SHORT, "trackers=[wandb]"), out, progress=False)
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()  # W&B's binary log: history rows keep their keys as text
    for tag in ("train/loss", "val/accuracy", "attention/gini", "zeroshot/shapes-zs-shape",
                "test/accuracy"):
        assert tag.encode() in data, tag
    assert data.count(b"train/loss") >= len(rec["history"]["loss"])
    assert rec["run_id"].encode() in data  # the W&B run id derives from it (resumable)


def test_a_tracker_not_installed_is_skipped_with_one_warning(tmp_path, monkeypatch):
    """The run completes, warns once with the install line, and says so in its record."""
    missing = dataclasses.replace(trackers.TRACKERS["wandb"], module="attndrift_no_such_pkg")
    monkeypatch.setitem(trackers.TRACKERS, "wandb", missing)
    with pytest.warns(UserWarning, match=r"tracker wandb is not installed.*\[wandb\]"):
        rec = run(tiny_config("tiny_full_ft", *SHORT, "trackers=[wandb]"), tmp_path,
                  progress=False)
    assert rec["status"] == "completed"
    assert any("tracker wandb is not installed" in w for w in rec["warnings"])
    assert not (tmp_path / "wandb").exists()


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="trackers"):
        tiny_config("tiny_full_ft", "trackers=[comet]")


def test_nan_drift_is_not_sent():
    """A drift from 0 has no size (NaN in the record): trackers get no point for it."""
    got = []

    class Collect:
        def scalar(self, tag, value, step):
            got.append((tag, value, step))

        def close(self, status):
            got.append(("closed", status, -1))

    t = trackers.Trackers([Collect()])
    t.scalar("a", math.nan, 1)
    t.scalar("b", None, 1)
    t.scalar("c", 0.5, 2)
    t.close("failed")
    assert got == [("c", 0.5, 2), ("closed", "failed", -1)] and not t


def test_tracker_names_add_tensorboard_once():
    assert trackers.tracker_names(["mlflow", "tensorboard"], tensorboard=True) == \
        ["mlflow", "tensorboard"]
    assert trackers.tracker_names([], tensorboard=True) == ["tensorboard"]
