"""Nothing lost, nothing silently wrong (issue 16): interrupts, overwrites, corrupt resume
state, bad image folders, unsafe ids, OS errors, wrong-typed records."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from attndrift.cli import app
from attndrift.records import read_record
from conftest import FAST, ROOT

runner = CliRunner()
TINY_FT = str(ROOT / "configs" / "runs" / "tiny_full_ft.yaml")
TINY_LORA = str(ROOT / "configs" / "runs" / "tiny_lora.yaml")
# 2 epochs x 4 steps, a checkpoint at every epoch end
SHORT = [*FAST, "data.train_limit=128", "train.epochs=2", "train.checkpoint_minutes=0",
         "probe.images=16", "data.zeroshot=[shapes-zs-shape]"]


def lines_of(output: str) -> list[str]:
    return [line for line in output.strip().splitlines() if line.strip()]


def interrupt_at_epoch_end(monkeypatch, after: int) -> None:
    """Ctrl-C at the epoch end after ``after`` validations (so ``after`` checkpoints exist)."""
    import attndrift.train as train

    real, calls = train.accuracy, {"n": 0}

    def accuracy(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "accuracy", accuracy)


# --- 1. an interrupt leaves the run resumable ---------------------------------------------

def test_ctrl_c_in_run_is_resumable_and_says_how(tmp_path, monkeypatch):
    out = tmp_path / "r"
    interrupt_at_epoch_end(monkeypatch, 1)
    result = runner.invoke(app, ["run", TINY_FT, *SHORT, "--out", str(out), "--quiet"])
    assert result.exit_code == 130
    (line,) = lines_of(result.output)
    assert line.startswith("error: interrupted") and "resum" in line and str(out) in line
    rec = read_record(out)
    assert rec["status"] == "interrupted" and (out / "resume.pt").is_file()
    monkeypatch.undo()
    result = runner.invoke(app, ["run", TINY_FT, *SHORT, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    rec = read_record(out)
    assert rec["status"] == "completed" and rec["timing"]["resumed"] == 1


def test_ctrl_c_in_study_run_is_resumed_by_the_next_study_run(tmp_path, monkeypatch):
    from attndrift.study.spec import load_study
    from attndrift.study.store import Store

    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({"name": "s", "base": TINY_FT, "runs": [{"name": "a"}],
                                 "set": {"data.train_limit": 128, "train.epochs": 2,
                                         "train.batch_size": 32, "probe.images": 16,
                                         "probe.per_epoch": 2, "train.checkpoint_minutes": 0,
                                         "data.zeroshot": ["shapes-zs-shape"]}}))
    store = tmp_path / "store"
    args = ["study", "run", str(study), "--store", str(store)]
    interrupt_at_epoch_end(monkeypatch, 1)
    result = runner.invoke(app, args)
    assert result.exit_code == 130
    assert lines_of(result.output)[-1].startswith("error: interrupted")
    assert "study run" in lines_of(result.output)[-1]
    (p,) = load_study(study)[1]
    assert Store(store).state(p.run_id).status == "interrupted"
    monkeypatch.undo()
    result = runner.invoke(app, args)  # no --retry-failed needed
    assert result.exit_code == 0, result.output
    rec = read_record(store / "runs" / p.run_id)
    assert rec["status"] == "completed" and rec["timing"]["resumed"] == 1


@pytest.mark.slow
def test_sigterm_of_run_records_interrupted_and_exits_130(tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "attndrift", "run", TINY_FT, *SHORT, "train.epochs=20",
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "resume.pt").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert read_record(out)["status"] == "interrupted"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "resum" in errors[0] and "Traceback" not in stderr
    # and every line printed in this non-TTY run is a plain progress line, one per epoch
    assert any("step 4/" in line and "val" in line for line in stderr.splitlines()), stderr


# --- 2. a completed run is never overwritten ----------------------------------------------

def test_completed_run_dir_is_never_overwritten(full_ft_run):
    before = (full_ft_run / "record.json").read_bytes()
    same = runner.invoke(app, ["run", TINY_FT, *FAST, "--out", str(full_ft_run)])
    assert same.exit_code == 0, same.output
    assert "already completed" in same.output
    other = runner.invoke(app, ["run", TINY_LORA, *FAST, "--out", str(full_ft_run)])
    assert other.exit_code == 2
    (line,) = lines_of(other.output)
    assert "another config" in line and "--out" in line and "--force" in line
    assert (full_ft_run / "record.json").read_bytes() == before


def test_default_out_is_per_run_id(tmp_path, monkeypatch):
    from attndrift.config import identity, load_config
    from attndrift.records import run_id_for

    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY_FT, [*SHORT, "train.max_steps=1"])
    run_id = run_id_for(identity(cfg.model_dump(mode="json")))
    result = runner.invoke(app, ["run", TINY_FT, *SHORT, "train.max_steps=1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert read_record(tmp_path / "runs" / run_id)["status"] == "completed"


# --- 3. corrupt resume state ----------------------------------------------------------------

def test_corrupt_resume_state_is_set_aside_and_the_run_restarts(tmp_path, monkeypatch):
    out = tmp_path / "r"
    interrupt_at_epoch_end(monkeypatch, 1)
    assert runner.invoke(app, ["run", TINY_FT, *SHORT, "--out", str(out)]).exit_code == 130
    monkeypatch.undo()
    (out / "resume.pt").write_bytes(b"PK\x03\x04 not really a zip")
    result = runner.invoke(app, ["run", TINY_FT, *SHORT, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    warn = [line for line in lines_of(result.output) if "resume.pt" in line]
    assert len(warn) == 1 and "corrupt" in warn[0] and "from scratch" in warn[0]
    assert "weights_only" not in result.output and "Traceback" not in result.output
    rec = read_record(out)
    assert rec["status"] == "completed" and "resumed" not in rec["timing"]
    assert len(list(out.glob("resume.pt.corrupt-*"))) == 1


def test_study_never_reports_success_with_a_run_unfinished(tmp_path):
    from attndrift.study.spec import load_study
    from attndrift.study.store import Store

    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({"name": "s", "base": TINY_FT, "runs": [{"name": "a"}]}))
    (p,) = load_study(study)[1]
    store = Store(tmp_path / "store")
    with store.lock(p.run_id):  # another worker holds the only run
        result = runner.invoke(app, ["study", "run", str(study), "--store", str(store.root)])
    assert result.exit_code == 1
    assert "not completed" in lines_of(result.output)[-1]
