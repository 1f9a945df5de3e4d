"""Studies: spec expansion, claims, crash resume, corrupt records, divergence, Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attndrift.config import ConfigError
from attndrift.records import read_record
from attndrift.study.executor import execute, execute_one
from attndrift.study.spec import StudySpec, expand, load_study
from attndrift.study.store import Store
from conftest import ROOT

# Tiny runs: 2 epochs x 4 steps, a few probe images, one zero-shot task.
TINY = {"train.epochs": 2, "data.train_limit": 128, "train.batch_size": 32,
        "probe.per_epoch": 2, "probe.images": 16, "train.log_every": 2,
        "data.zeroshot": ["shapes-zs-shape"], "train.checkpoint_minutes": 0}


def write_study(tmp_path: Path, grids=None, runs=None, name="t") -> Path:
    spec = {"name": name, "base": str(ROOT / "configs" / "runs" / "tiny_full_ft.yaml"),
            "set": TINY, "grids": grids or [], "runs": runs or []}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def test_expansion_is_pure_stable_and_readable():
    spec = StudySpec.model_validate({
        "name": "s", "set": {"train.epochs": 1},
        "runs": [{"name": "solo", "set": {"method": "lora"}}],
        "grids": [{"name": "g", "axes": {"method": ["full_ft", "lora"], "train.lr": [1e-4, 1e-3]},
                   "where": [{"if": {"method": "lora"}, "set": {"lora.r": 4}}]}]})
    a, b = expand(spec, {}), expand(spec, {})
    assert [p.run_id for p in a] == [p.run_id for p in b]
    assert len(a) == 5 and len({p.run_id for p in a}) == 5
    assert a[1].run_id.startswith("g-method=full_ft-lr=0.0001-")
    assert [p.config.lora.r for p in a[1:]] == [8, 8, 4, 4]
    assert all(p.config.train.epochs == 1 for p in a)
    # changing one value changes exactly that run's id
    spec2 = spec.model_copy(update={"set": {"train.epochs": 2}})
    assert not {p.run_id for p in expand(spec2, {})} & {p.run_id for p in a}


def test_bad_study_entries_name_the_problem(tmp_path):
    bad = write_study(tmp_path, grids=[{"name": "g", "axes": {"train.lr": ["fast"]}}])
    with pytest.raises(ConfigError, match=r"g-lr=fast: train.lr"):
        load_study(bad)
    path = tmp_path / "x.yaml"
    path.write_text("name: x\ngridz: []\n")
    with pytest.raises(ConfigError, match="gridz"):
        load_study(path)
    dup = write_study(tmp_path, runs=[{"name": "a"}, {"name": "a"}], name="d")
    with pytest.raises(ConfigError, match="duplicate"):
        load_study(dup)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "studies").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_studies_expand(path):
    spec, planned = load_study(path)
    expected = {"paper21": 21, "matched_lr80": 80, "backbone": 4}.get(spec.name)
    if expected is not None:
        assert len(planned) == expected
    assert "Command:" in path.read_text() and "Expected" in path.read_text()


def test_nan_run_diverges_and_the_others_complete(tmp_path):
    study = write_study(tmp_path, runs=[{"name": "ok"}, {"name": "boom", "set": {
        "train.lr": 1e30, "train.grad_clip": None}}, {"name": "ok2", "set": {"seed": 1}}])
    _, planned = load_study(study)
    store = Store(tmp_path / "store")
    outcomes = {o.run_id.split("-")[0]: o.status for o in execute(store, planned, progress=False)}
    assert outcomes == {"ok": "completed", "boom": "diverged", "ok2": "completed"}
    # completed runs are skipped on the next pass; diverged ones only with retry_failed
    again = execute(store, planned, progress=False)
    assert {o.status for o in again} == {"skipped-done"}
    retried = execute(store, planned, retry_failed=True, progress=False)
    assert sorted(o.status for o in retried) == ["diverged", "skipped-done", "skipped-done"]


def test_truncated_record_is_redone(tmp_path):
    _, planned = load_study(write_study(tmp_path, runs=[{"name": "a"}]))
    store = Store(tmp_path / "store")
    execute(store, planned, progress=False)
    path = store.run_dir(planned[0].run_id) / "record.json"
    path.write_text(path.read_text()[:200])  # half-written
    assert store.state(planned[0].run_id).status == "corrupt"
    (outcome,) = execute(store, planned, progress=False)
    assert outcome.status == "completed" and read_record(path)["status"] == "completed"


def test_a_held_claim_is_skipped(tmp_path):
    _, planned = load_study(write_study(tmp_path, runs=[{"name": "a"}]))
    store = Store(tmp_path / "store")
    p = planned[0]
    with store.lock(p.run_id):
        # a second claimant in this process must not get the lock either
        outcome = execute_one(str(store.root), p.run_id, p.config.model_dump(mode="json"), False)
    assert outcome.status == "skipped-busy"


def _interrupting_accuracy(real, calls_before_crash):
    calls = {"n": 0}

    def accuracy(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > calls_before_crash:
            raise KeyboardInterrupt  # like Ctrl-C / a crash between checkpoints
        return real(*args, **kwargs)

    return accuracy


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    import attndrift.train as train
    from attndrift.config import load_config

    cfg = load_config(ROOT / "configs" / "runs" / "tiny_lora.yaml",
                      [f"{k}={json.dumps(v)}" for k, v in TINY.items()] + ["train.epochs=3"])
    ref = train.run(cfg, tmp_path / "ref", progress=False)
    real = train.accuracy
    # crash at the end of epoch 2 (after the epoch-1 checkpoint), then run again
    monkeypatch.setattr(train, "accuracy", _interrupting_accuracy(real, 1))
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / "resume.pt").is_file()
    monkeypatch.setattr(train, "accuracy", real)
    resumed = train.run(cfg, tmp_path / "cut", progress=False)
    assert resumed["status"] == "completed" and resumed["timing"]["resumed"] == 1
    assert "error" not in resumed and "traceback" not in resumed  # the crash's, now stale
    for key in ("final", "zeroshot", "baseline", "history"):
        assert resumed[key] == ref[key], key
    a, b = load_file(tmp_path / "ref" / "final.safetensors"), load_file(
        tmp_path / "cut" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / "resume.pt").exists()


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it reaches the disk."""


def test_kill_between_resume_state_and_record_still_resumes(tmp_path, monkeypatch):
    # SIGKILL right after resume.pt landed, before the record was rewritten: record.json is
    # then still the one written when the run started (no baseline yet). The resume state
    # alone must be enough.
    import attndrift.train as train
    from attndrift.config import load_config

    cfg = load_config(ROOT / "configs" / "runs" / "tiny_full_ft.yaml",
                      [f"{k}={json.dumps(v)}" for k, v in TINY.items()] + ["train.epochs=3"])
    ref = train.run(cfg, tmp_path / "ref", progress=False)
    real_save, real_write = train.save_resume, train.write_record
    killed = {"now": False}

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        killed["now"] = True
        raise _Killed

    def write_unless_dead(*args, **kwargs):
        if not killed["now"]:
            real_write(*args, **kwargs)

    monkeypatch.setattr(train, "save_resume", save_then_die)
    monkeypatch.setattr(train, "write_record", write_unless_dead)
    with pytest.raises(_Killed):
        train.run(cfg, tmp_path / "cut", progress=False)
    assert read_record(tmp_path / "cut")["status"] == "running"
    assert read_record(tmp_path / "cut")["baseline"] == {}
    monkeypatch.setattr(train, "save_resume", real_save)
    monkeypatch.setattr(train, "write_record", real_write)
    resumed = train.run(cfg, tmp_path / "cut", progress=False)
    assert resumed["status"] == "completed" and resumed["timing"]["resumed"] == 1
    for key in ("final", "zeroshot", "baseline", "history", "sanity"):
        assert resumed[key] == ref[key], key


def _worker(store_root: str, study: str, out: str) -> None:
    # one concurrent worker: its own process, the same store
    from attndrift.study.executor import execute
    from attndrift.study.spec import load_study
    from attndrift.study.store import Store

    torch.set_num_threads(1)
    _, planned = load_study(study)
    outcomes = execute(Store(store_root), planned, progress=False)
    Path(out).write_text(json.dumps([[o.run_id, o.status] for o in outcomes]))


@pytest.mark.slow
def test_two_concurrent_workers_run_each_run_once(tmp_path):
    import multiprocessing

    study = write_study(tmp_path, grids=[{"name": "g", "axes": {"seed": [0, 1, 2, 3]}}])
    store = tmp_path / "store"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(store), str(study), str(tmp_path / f"w{i}")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    ran: dict[str, int] = {}
    for i in range(2):
        for run_id, status in json.loads((tmp_path / f"w{i}").read_text()):
            if status == "completed":
                ran[run_id] = ran.get(run_id, 0) + 1
    assert len(ran) == 4 and set(ran.values()) == {1}
    assert all(read_record(store / "runs" / r)["status"] == "completed" for r in ran)


@pytest.mark.slow
def test_kill_9_mid_study_then_rerun_completes_every_run_once(tmp_path):
    study = write_study(tmp_path, grids=[{"name": "g", "axes": {"seed": [0, 1]}}],
                        runs=[{"name": "solo", "set": {"train.epochs": 3}}])
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "attndrift", "study", "run", str(study), "--store", str(store)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # kill once the first run has written an epoch checkpoint but not finished
    deadline = time.time() + 240
    while time.time() < deadline and not list(store.glob("runs/*/resume.pt")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(store.glob("runs/*/resume.pt")), "the study never checkpointed"
    _, planned = load_study(study)
    outcomes = execute(Store(store), planned, progress=False)
    assert sorted(o.status for o in outcomes).count("completed") >= 1
    for p in planned:
        rec = read_record(store / "runs" / p.run_id)
        assert rec["status"] == "completed"
    assert sum(read_record(store / "runs" / p.run_id)["timing"].get("resumed", 0)
               for p in planned) == 1
    leftovers = [f for f in store.rglob("*") if f.name.endswith(".tmp") or f.name == "resume.pt"]
    assert leftovers == []


@pytest.mark.slow
def test_ray_backend_completes_a_four_run_study(tmp_path):
    ray = pytest.importorskip("ray")
    study = write_study(tmp_path, grids=[{"name": "g", "axes": {"seed": [0, 1],
                                                                "method": ["full_ft", "lora"]}}])
    _, planned = load_study(study)
    store = Store(tmp_path / "store")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcomes = execute(store, planned, backend="ray", cpus_per_run=1)
    finally:
        ray.shutdown()
    assert sorted(o.status for o in outcomes) == ["completed"] * 4
    assert all(store.state(p.run_id).status == "completed" for p in planned)


@pytest.mark.slow
def test_local_pool_spreads_workers_over_the_given_gpus(tmp_path):
    """--workers 2 --gpus 3,5: each spawned worker sees only its GPU (CUDA_VISIBLE_DEVICES set
    before it touches CUDA), recorded in each run's provenance; the parent is left alone."""
    study = write_study(tmp_path, grids=[{"name": "g", "axes": {"seed": [0, 1]}}])
    _, planned = load_study(study)
    store = Store(tmp_path / "store")
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    outcomes = execute(store, planned, workers=2, gpus=["3", "5"], progress=False)
    assert sorted(o.status for o in outcomes) == ["completed", "completed"]
    seen = [read_record(store.run_dir(p.run_id))["provenance"]["cuda_visible_devices"]
            for p in planned]
    assert all(v in ("3", "5") for v in seen), seen
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before


def _holder_of(lock: Path) -> int | None:
    """The pid of the process (not this one) with ``lock`` open: the worker running the run."""
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if int(fd.parts[2]) != os.getpid() and Path(os.readlink(fd)) == lock:
                return int(fd.parts[2])
        except (OSError, ValueError):
            continue
    return None


def _once_checkpointed(run_dir: Path, act, deadline_s: float = 240) -> None:
    """In a thread: once ``run_dir`` holds a resume checkpoint, ``act()``."""
    def watch() -> None:
        deadline = time.time() + deadline_s
        while time.time() < deadline and not (run_dir / "resume.pt").exists():
            time.sleep(0.05)
        act()

    import threading

    threading.Thread(target=watch, daemon=True).start()


@pytest.mark.slow
def test_ray_retries_a_dead_worker_and_records_a_cancel_as_interrupted(tmp_path):
    """A Ray worker SIGKILLed mid-run (a lost spot node): Ray starts the run again, it resumes
    from its checkpoint and ends with the record of an uninterrupted run. Ctrl-C of the driver:
    the running run records itself ``interrupted`` (it said ``running``)."""
    ray = pytest.importorskip("ray")
    import _thread

    import attndrift.train as train

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("finds the worker process through /proc")
    study = write_study(tmp_path, runs=[{"name": "a", "set": {"train.epochs": 4}},
                                        {"name": "b", "set": {"train.epochs": 4, "seed": 1}}])
    _, (a, b) = load_study(study)
    store = Store(tmp_path / "store")
    killed: list[int] = []

    def kill_worker() -> None:
        pid = _holder_of(store.run_dir(a.run_id) / ".lock")
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        _once_checkpointed(store.run_dir(a.run_id), kill_worker)
        (outcome,) = execute(store, [a], backend="ray", ray_retries=2)
        assert killed and outcome.status == "completed", (killed, outcome)
        _once_checkpointed(store.run_dir(b.run_id), _thread.interrupt_main)
        with pytest.raises(KeyboardInterrupt):
            execute(store, [b], backend="ray")
    finally:
        ray.shutdown()
    assert read_record(store.run_dir(b.run_id))["status"] == "interrupted"
    record = read_record(store.run_dir(a.run_id))
    assert record["status"] == "completed" and record["timing"]["resumed"] == 1
    torch.set_num_threads(1)  # as the Ray task ran (cpus_per_run=1)
    try:
        ref = train.run(a.config, tmp_path / "ref", progress=False)
    finally:
        torch.set_num_threads(2)
    for key in ("final", "zeroshot", "baseline", "history"):
        assert record[key] == ref[key], key
