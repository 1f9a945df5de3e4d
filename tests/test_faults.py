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
    _, stderr = proc.communicate(timeout=60)
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


# --- 5. image folders: every mode decoded, bad folders refused before training ------------

def _reopened(tmp_path: Path, image, name: str):
    from PIL import Image

    path = tmp_path / name
    image.save(path)
    return Image.open(path)


def test_every_pil_mode_decodes_to_the_rgb_it_shows(tmp_path):
    from PIL import Image

    from attndrift.data.base import rgb_image

    def check(image, expected, tol=0):
        got = np.asarray(rgb_image(image), dtype=np.int64)
        assert got.shape == (*image.size[::-1], 3)
        assert np.abs(got - np.asarray(expected)).max() <= tol, (image.mode, got[0, 0])

    wide = np.full((4, 5), 40000, dtype=np.uint16)
    wide[0, 0] = 65535
    sixteen = _reopened(tmp_path, Image.fromarray(wide), "g16.png")
    assert sixteen.mode in ("I;16", "I")
    expected = np.repeat(np.rint(wide.astype(np.float64) * 255 / 65535)[..., None], 3, -1)
    check(sixteen, expected)  # was all white: PIL clips 40000 to 255
    assert expected[1, 1, 0] == 156

    pal = Image.new("P", (5, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    check(_reopened(tmp_path, pal, "p.png"), np.broadcast_to([10, 200, 30], (4, 5, 3)))

    check(_reopened(tmp_path, Image.new("L", (5, 4), 77), "l.png"),
          np.full((4, 5, 3), 77))

    rgba = _reopened(tmp_path, Image.new("RGBA", (5, 4), (200, 100, 50, 128)), "a.png")
    a = 128 / 255  # over white, as a viewer shows it
    check(rgba, np.broadcast_to([a * c + (1 - a) * 255 for c in (200, 100, 50)], (4, 5, 3)),
          tol=1)

    cmyk = _reopened(tmp_path, Image.new("CMYK", (5, 4), (55, 0, 255, 0)), "c.tif")
    assert cmyk.mode == "CMYK"
    check(cmyk, np.broadcast_to([200, 255, 0], (4, 5, 3)))


def _folder(root: Path, splits: dict[str, list[str]], n: int = 3, size: int = 8) -> Path:
    from PIL import Image

    for split, classes in splits.items():
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                value = np.full((size, size), 10000 * (c + 1) + i, dtype=np.uint16)
                Image.fromarray(value).save(root / split / cls / f"{i}.png")
    return root


def test_imagefolder_decodes_16_bit_and_lines_up_labels(tmp_path, monkeypatch):
    from attndrift.data.imagefolder import load_imagefolder

    monkeypatch.setenv("ATTNDRIFT_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "f", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    task = load_imagefolder(f"imagefolder:{root}", "test", image_size=8, progress=False)
    assert task.class_names == ["cat", "dog"] and task.labels.tolist() == [0, 0, 0, 1, 1, 1]
    expected = [round((10000 * (label + 1) + i) * 255 / 65535)
                for label in (0, 1) for i in range(3)]
    assert task.images[:, :, 0, 0].tolist() == [[v] * 3 for v in expected]


@pytest.mark.parametrize(("splits", "needle"), [
    ({"train": ["cat", "dog"], "test": ["cat", "cow"]}, "different classes"),
    ({"train": ["cat"], "test": ["cat"]}, "needs >= 2"),
    ({"train": ["cat", "dog"]}, "no test/ directory"),
])
def test_bad_image_folders_fail_validation(tmp_path, splits, needle):
    from attndrift.config import ConfigError, load_config

    root = _folder(tmp_path / "f", splits, n=1)
    with pytest.raises(ConfigError, match=needle) as info:
        load_config(TINY_FT, [f"data.dataset=imagefolder:{root}"])
    assert "\n" not in str(info.value)
    result = runner.invoke(app, ["run", TINY_FT, f"data.dataset=imagefolder:{root}",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and not (tmp_path / "r").exists()


def test_a_corrupt_image_is_named_in_one_line(tmp_path, monkeypatch):
    from attndrift.data.imagefolder import ImageFolderError, load_imagefolder

    monkeypatch.setenv("ATTNDRIFT_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "f", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(ImageFolderError) as info:
        load_imagefolder(f"imagefolder:{root}", "train", image_size=8, progress=False)
    assert str(info.value).startswith(str(bad)) and "\n" not in str(info.value)


def test_bad_images_are_skipped_with_a_count_if_asked(tmp_path, monkeypatch, capsys):
    from attndrift.config import ConfigError, load_config
    from attndrift.data.imagefolder import ImageFolderError, load_imagefolder

    monkeypatch.setenv("ATTNDRIFT_CACHE", str(tmp_path / "cache"))
    root = _folder(tmp_path / "f", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    (root / "train" / "cat" / "2.png").write_bytes(b"not a png")
    task = load_imagefolder(f"imagefolder:{root}?skip_bad_images=true", "train", image_size=8,
                            progress=False)
    assert task.labels.tolist() == [0, 0, 1, 1]  # cat 0, 1; dog 0, 2: labels still line up
    expected = [round((10000 * (c + 1) + i) * 255 / 65535) for c, i in
                ((0, 0), (0, 1), (1, 0), (1, 2))]
    assert task.images[:, 0, 0, 0].tolist() == expected
    (line,) = lines_of(capsys.readouterr().err)
    assert "skipped 2 of 6 images" in line and str(root / "train") in line
    with pytest.raises(ImageFolderError):  # not asked: the first bad file stops the load
        load_imagefolder(f"imagefolder:{root}?skip_bad_images=false", "train", image_size=8,
                         progress=False)
    with pytest.raises(ConfigError, match="skip_bad_images=true"):
        load_config(TINY_FT, [f"data.dataset=imagefolder:{root}?skip_bad=yes"])


# --- 9. run ids are one safe path component -------------------------------------------------

def test_grid_values_never_make_paths_outside_the_store(tmp_path):
    from attndrift.models.clip import TINY_CLIP_DIR
    from attndrift.study.spec import StudySpec, expand
    from attndrift.study.store import Store

    sneaky = f"{TINY_CLIP_DIR}/../tiny_clip"  # a real model, reached through ../
    spec = StudySpec.model_validate({"name": "s", "grids": [
        {"name": "g", "axes": {"model": [sneaky, "tiny"]}}]})
    store = Store(tmp_path / "store")
    for p in expand(spec, {}):
        assert "/" not in p.run_id and not p.run_id.startswith(".") and ".." not in p.run_id
        run_dir = store.run_dir(p.run_id)
        assert run_dir.parent == store.root / "runs"
    assert expand(spec, {})[1].run_id.startswith("g-model=tiny-")  # safe ids stay as they were
    for bad in ("../../evil", "a/b", ".hidden", ".."):
        with pytest.raises(ValueError, match="not a safe directory name"):
            store.run_dir(bad)
    assert not (tmp_path / "evil").exists()


# --- 12. a full disk or read-only filesystem: one line, nothing partial, record intact -----

def _disk_full_for(monkeypatch, name_part: str) -> None:
    """Writes of files whose name contains ``name_part`` fail as on a full disk (ENOSPC)."""
    import attndrift.records as records

    real = records.os.fsync
    paths: dict[int, str] = {}
    real_mkstemp = records.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, tmp = real_mkstemp(*args, **kwargs)
        paths[fd] = tmp
        return fd, tmp

    def fsync(fd):
        if name_part in paths.get(fd, ""):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(records.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(records.os, "fsync", fsync)


def test_full_disk_leaves_the_old_record_and_no_temp_file(tmp_path, monkeypatch):
    from attndrift.records import new_record, write_record

    path = tmp_path / "record.json"
    write_record(path, new_record("a-1", {}))
    before = path.read_bytes()
    _disk_full_for(monkeypatch, "record.json")
    with pytest.raises(OSError) as info:
        write_record(path, {**new_record("a-1", {}), "status": "completed"})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_full_disk_in_run_is_one_line_naming_the_file(tmp_path, monkeypatch):
    out = tmp_path / "r"
    _disk_full_for(monkeypatch, "final.safetensors")
    result = runner.invoke(app, ["run", TINY_FT, *SHORT, "train.max_steps=2", "--out", str(out),
                                 "--quiet"])
    assert result.exit_code == 1
    (line,) = lines_of(result.output)
    assert f"cannot write {out / 'final.safetensors'}: No space left on device" in line
    assert not list(out.glob(".*.tmp"))
    assert read_record(out)["status"] == "failed"  # the small record still fitted


def test_unwritable_report_and_store_are_one_line(tmp_path, full_ft_run, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = runner.invoke(app, ["report", str(full_ft_run.parent), "--out",
                                 str(blocker / "report")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = lines_of(result.output)
    assert str(blocker) in line
    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({"name": "s", "base": TINY_FT, "runs": [{"name": "a"}]}))
    _disk_full_for(monkeypatch, "study.json")
    result = runner.invoke(app, ["study", "run", str(study), "--store", str(tmp_path / "st")])
    assert result.exit_code == 1
    (line,) = lines_of(result.output)
    assert "cannot write" in line and "study.json: No space left on device" in line


# --- 13. wrong-typed record fields: corrupt, with the field named --------------------------

@pytest.mark.parametrize(("edit", "field"), [
    ({"final": "oops"}, "final"),
    ({"zeroshot": {"t": 5}}, "zeroshot.t"),
    ({"final": {"test_acc": "high"}}, "final.test_acc"),
])
def test_wrong_typed_records_are_corrupt_and_the_rest_is_reported(tmp_path, full_ft_run, edit,
                                                                  field):
    import shutil

    from attndrift.analysis.runs import load_run

    store = tmp_path / "store"
    shutil.copytree(full_ft_run, store / "good")
    bad = store / "bad"
    bad.mkdir()
    record = json.loads((full_ft_run / "record.json").read_text())
    record.update(edit)
    (bad / "record.json").write_text(json.dumps(record))
    run = load_run(bad)
    assert run.status == "corrupt" and field in run.error
    result = runner.invoke(app, ["compare", str(store / "good"), str(bad)])
    assert result.exit_code == 0, result.output
    assert "corrupt" in result.output and field in result.output and "good" in result.output
    result = runner.invoke(app, ["report", str(store), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert "1 corrupt" in result.output and (tmp_path / "rep" / "report.md").is_file()


# --- 7, 8. typos, empty studies and empty configs are errors -------------------------------

@pytest.mark.parametrize(("spec", "needle"), [
    ({"name": "s"}, "no runs and no grids"),
    ({"name": "s", "grids": [{"name": "g", "axes": {"seed": []}}]}, "axis seed has no values"),
    ({"name": "s", "grids": [{"name": "g", "axes": {"method": ["full_ft", "lora"]},
                              "where": [{"if": {"metod": "lora"}, "set": {"lora.r": 4}}]}]},
     "if key 'metod' is not an axis"),
    ({"name": "s", "grids": [{"name": "g", "axes": {"method": ["full_ft", "lora"]},
                              "where": [{"if": {"method": "LoRA"}, "set": {"lora.r": 4}}]}]},
     "matches no value"),
])
def test_study_typos_and_empty_studies_are_errors(tmp_path, spec, needle):
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(spec))
    result = runner.invoke(app, ["study", "run", str(path), "--store", str(tmp_path / "st")])
    assert result.exit_code == 2
    (line,) = lines_of(result.output)
    assert needle in line and "Value error" not in line
    assert not (tmp_path / "st").exists()


def test_empty_config_is_an_error_and_layout_flip_is_off(tmp_path):
    from attndrift.config import ConfigError, load_config

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    result = runner.invoke(app, ["validate", str(empty)])
    assert result.exit_code == 2 and "is empty" in result.output
    assert load_config(None).train.flip is False  # shapes-layout: left/right labels
    assert load_config(None, ["data.dataset=shapes-objects"]).train.flip is True
    with pytest.raises(ConfigError, match="swaps the labels of shapes-layout"):
        load_config(None, ["train.flip=true"])


# --- 10. files respect the umask --------------------------------------------------------------

def test_atomic_writes_respect_the_umask(tmp_path):
    from attndrift.records import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a", b"x")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "b", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o644  # was 0600 (mkstemp)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o600


# --- 4. workers exit when their parent dies ----------------------------------------------------

def test_a_worker_exits_when_its_parent_dies(tmp_path):
    # parent: a shell that starts the "worker" (python watching it), then is killed with -9
    code = ("import os, sys, time; from attndrift.study.executor import exit_with_parent, "
            "_interrupt_on_sigterm; _interrupt_on_sigterm(); exit_with_parent(os.getppid(), "
            "poll_s=0.05, grace_s=5)\n"
            "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            f"    open({str(tmp_path / 'interrupted')!r}, 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    pidfile = tmp_path / "pid"
    parent = subprocess.Popen(["sh", "-c", f'{sys.executable} -c "$0" & echo $! > {pidfile}; '
                               "wait", code], env=env)
    deadline = time.time() + 30
    while time.time() < deadline and not (pidfile.exists() and pidfile.read_text().strip()):
        time.sleep(0.05)
    worker = int(pidfile.read_text())
    time.sleep(1.5)  # the worker has imported and started watching
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(f"/proc/{worker}"):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{worker}"), "the worker outlived its parent"
    assert (tmp_path / "interrupted").exists()  # SIGTERM first: the run records itself


# --- 15. counters stay within bounds under --retry-failed ----------------------------------

def test_retry_failed_counters_stay_within_bounds(tmp_path):
    import re

    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({"name": "s", "base": TINY_FT, "runs": [{"name": "boom", "set": {
        "train.lr": 1e30, "train.grad_clip": None, "train.max_steps": 2, "train.log_every": 1,
        "data.train_limit": 64, "probe.images": 16, "data.zeroshot": ["shapes-zs-shape"]}}]}))
    args = ["study", "run", str(study), "--store", str(tmp_path / "st")]
    assert runner.invoke(app, args).exit_code == 1
    result = runner.invoke(app, [*args, "--retry-failed"])
    assert result.exit_code == 1
    (progress,) = [line for line in lines_of(result.output) if line.startswith("[")]
    done, total = map(int, re.match(r"\[(\d+)/(\d+)\]", progress).groups())
    assert (done, total) == (1, 1) and "left 0," in progress  # was [2/1] ... left -1


# --- 15. workers and separate processes split the cores ----------------------------------

def test_torch_threads_split_the_cores():
    from attndrift.runtime import torch_threads

    assert torch_threads(4, env={}, cores=16) == 4  # 4 workers x 4 threads = 16 cores
    assert torch_threads(3, env={}, cores=16) == 5 and torch_threads(32, env={}, cores=16) == 1
    assert torch_threads(1, env={}, cores=16) is None  # one run: torch's own default
    # an explicit count is per run process and wins over the split: --threads, then env
    assert torch_threads(4, env={"OMP_NUM_THREADS": "2"}, cores=16) == 2
    assert torch_threads(1, env={"OMP_NUM_THREADS": "3"}, cores=16) == 3
    env = {"ATTNDRIFT_THREADS": "6", "OMP_NUM_THREADS": "2"}
    assert torch_threads(4, env=env, cores=16) == 6
    assert torch_threads(4, 7, env=env, cores=16) == 7
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match=f"ATTNDRIFT_THREADS={bad}: give a positive"):
            torch_threads(2, env={"ATTNDRIFT_THREADS": bad}, cores=16)


def test_study_run_threads_option_sets_the_runs_threads(tmp_path):
    import torch

    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({"name": "s", "base": TINY_FT, "runs": [{"name": "one", "set": {
        "train.max_steps": 2, "data.train_limit": 64, "probe.images": 16,
        "data.zeroshot": ["shapes-zs-shape"]}}]}))
    args = ["study", "run", str(study), "--store", str(tmp_path / "st")]
    result = runner.invoke(app, [*args, "--threads", "0"])
    assert result.exit_code == 2 and "--threads 0: give a positive integer" in result.output
    before = torch.get_num_threads()  # 2 (conftest)
    result = runner.invoke(app, [*args, "--threads", "1"])
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "st" / "runs").iterdir()
    assert read_record(run_dir)["provenance"]["cpu_threads"] == 1 != before
    assert torch.get_num_threads() == before  # the caller's setting is left as it was


# --- 11. the Markdown report does not embed run strings raw ----------------------------------

def test_markdown_escaping_of_run_strings():
    from attndrift.report.render import md_escape, md_no_html

    assert md_escape("a|b<img src=x onerror=alert(1)>[l](u)`c`\nd") == (
        "a\\|b\\<img src=x onerror=alert(1)\\>\\[l\\](u)\\`c\\` d")
    assert md_escape("tiny_full_ft") == "tiny_full_ft"  # ordinary names unchanged
    assert md_no_html("| <b>x</b> |") == "| &lt;b&gt;x&lt;/b&gt; |"


# --- 17. a hub id that is not cached fails fast, in one line, with the fix ------------------

HUB_ID = "openai/clip-vit-base-patch32"


def test_uncached_hub_id_offline_is_one_line_at_validation(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1; this machine's cache holds no hub model. `validate`
    # reports a valid config that needs the hub (exit 0, issue 22.10); `run` refuses it.
    for args, code in ((["validate", TINY_FT, "--set", f"model={HUB_ID}"], 0),
                       (["run", TINY_FT, f"model={HUB_ID}", "--out", str(tmp_path / "r")], 2)):
        result = runner.invoke(app, args)
        assert result.exit_code == code, result.output
        (line,) = lines_of(result.output)
        assert line.startswith("needs the hub" if code == 0 else "error:")
        assert HUB_ID in line and "HF_HUB_OFFLINE" in line and "HF_HOME" in line
        assert "save_pretrained" in line
    assert not (tmp_path / "r").exists()  # refused before anything is recorded
    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({"name": "s", "base": TINY_FT, "grids": [
        {"name": "g", "axes": {"model": ["tiny", HUB_ID]}}]}))
    result = runner.invoke(app, ["study", "run", str(study), "--store", str(tmp_path / "st")])
    assert result.exit_code == 2
    (line,) = lines_of(result.output)
    assert HUB_ID in line and "HF_HUB_OFFLINE" in line
    assert not (tmp_path / "st").exists()


def test_uncached_hub_dataset_offline_is_one_line_at_validation(tmp_path, monkeypatch):
    import huggingface_hub

    for override, ident in (("data.zeroshot=[shapes-zs-shape,eurosat]", "tanganke/eurosat"),
                            ("data.dataset=hf:someorg/flowers?label=y", "someorg/flowers")):
        result = runner.invoke(app, ["validate", TINY_FT, "--set", override])
        assert result.exit_code == 0, result.output
        (line,) = lines_of(result.output)
        assert line.startswith("needs the hub") and ident in line
        assert f"$ATTNDRIFT_DATA_ROOT/{ident}" in line and "save_to_disk" in line
    # a cached download (the hub cache's layout) passes
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub" / "datasets--tanganke--eurosat" / "snapshots").mkdir(parents=True)
    result = runner.invoke(app, ["validate", TINY_FT, "--set", "data.zeroshot=[eurosat]"])
    assert result.exit_code == 0, result.output


UNREACHABLE = r"""
import json, shutil, sys, time
from pathlib import Path
from typer.testing import CliRunner
from attndrift.cli import app
from attndrift.models.clip import TINY_CLIP_DIR, load_clip

config, out = sys.argv[1], Path(sys.argv[2])
result = {}
t0 = time.monotonic()
r = CliRunner().invoke(app, ["validate", config, "--set", "model=openai/clip-vit-base-patch32"])
result["validate"] = [r.exit_code, r.output, time.monotonic() - t0]
t0 = time.monotonic()
r = CliRunner().invoke(app, ["run", config, "model=openai/clip-vit-base-patch32",
                             "--out", str(out / "r")])
result["run"] = [r.exit_code, r.output, time.monotonic() - t0]
t0 = time.monotonic()
r = CliRunner().invoke(app, ["validate", config, "--set", "data.zeroshot=[eurosat]"])
result["dataset"] = [r.exit_code, r.output, time.monotonic() - t0]
# a cached hub model loads from the cache while the hub is unreachable, without retries
snap = out / "hf" / "hub" / "models--someorg--cached-clip" / "snapshots" / ("a" * 40)
shutil.copytree(TINY_CLIP_DIR, snap)
(snap.parents[1] / "refs").mkdir()
(snap.parents[1] / "refs" / "main").write_text("a" * 40)
t0 = time.monotonic()
loaded = load_clip("someorg/cached-clip")
result["cached"] = [len(loaded.tokenizer), loaded.image_size, time.monotonic() - t0]
print(json.dumps(result))
"""


def test_uncached_hub_id_with_the_hub_unreachable_fails_fast(tmp_path):
    """No HF_HUB_OFFLINE, the hub at a closed local port: one probe, one line, exit 2 (it was
    ~60 s of retries and then a failed record); a cached model still loads."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                "HF_HUB_ETAG_TIMEOUT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", UNREACHABLE, TINY_FT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for command, expected in (("validate", 0), ("run", 2)):  # validate: valid, needs the hub
        code, output, seconds = result[command]
        assert code == expected, output
        (line,) = lines_of(output)
        assert HUB_ID in line and "127.0.0.1:9 is unreachable" in line and "HF_HOME" in line
        assert seconds < 10, f"{command} took {seconds:.1f}s"  # one try, no backoff
    assert not (tmp_path / "r").exists()
    code, output, seconds = result["dataset"]
    (line,) = lines_of(output)
    assert code == 0 and "'tanganke/eurosat' is not cached" in line and seconds < 10
    assert "127.0.0.1:9 is unreachable" in line and "$ATTNDRIFT_DATA_ROOT" in line
    vocab, image_size, seconds = result["cached"]
    assert vocab > 10 and image_size > 0 and seconds < 15
