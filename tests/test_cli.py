"""The CLI in-process (typer's runner): exit codes and one-line messages."""

import pytest
from typer.testing import CliRunner

from attndrift.cli import app
from attndrift.records import read_record
from conftest import FAST, ROOT

runner = CliRunner()
TINY_FT = str(ROOT / "configs" / "runs" / "tiny_full_ft.yaml")


@pytest.mark.parametrize(("override", "needle"), [
    ("train.lrr=1", "unknown key 'train.lrr'"),
    ("train.lr=abc", "train.lr"),
    ("train.lr=.nan", "finite"),
    ("probe.images=many", "probe.images"),
])
def test_run_rejects_bad_config_with_exit_2(tmp_path, override, needle):
    result = runner.invoke(app, ["run", TINY_FT, override, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:")
    assert not (tmp_path / "r").exists()  # nothing started, nothing written


def test_validate(tmp_path):
    assert runner.invoke(app, ["validate", TINY_FT]).exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: full_ft\ntrain:\n  lr: fast\n")
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "train.lr" in result.output


@pytest.mark.parametrize(("override", "needle"), [
    ("data.dataset=nope", "unknown dataset 'nope'"),
    ("data.zeroshot=[shapes-zs-shape, nope]", "unknown dataset 'nope'"),
    ("model=./no/such/model", "does not exist"),
])
def test_unknown_names_and_paths_fail_validation_with_no_record(tmp_path, override, needle):
    # checked at validation: exit 2, one line, nothing written (was: a failed run 11 s later)
    for args in (["run", TINY_FT, override, "--out", str(tmp_path / "r")],
                 ["validate", TINY_FT, "--set", override]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "r").exists()


def test_run_then_compare(tmp_path, full_ft_run, lora_run):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", TINY_FT, *FAST, "train.max_steps=4", "--out", str(out),
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert "completed" in result.output and (out / "record.json").is_file()
    # one drift everywhere (issue 22 item 7): the subset mean compare and report show, with
    # subset 0 labelled
    ran = read_record(out)["final"]
    assert (f"Δentropy {ran['delta_pct_subset_mean']['entropy']:+.2f}% (subset mean; subset 0: "
            f"{ran['delta_pct']['entropy']:+.2f}%)") in " ".join(result.output.split())
    result = runner.invoke(app, ["compare", str(full_ft_run), str(lora_run)])
    assert result.exit_code == 0, result.output
    # labelled by run directory (config names need not differ), not by config name
    for needle in (full_ft_run.name, lora_run.name, "shapes-zs-shape", "Per-layer change"):
        assert needle in result.output
    # drift as the report reads it: the mean over the fixed probe subsets (002)
    final = read_record(full_ft_run)["final"]
    assert f"{final['delta_pct_subset_mean']['entropy']:+.2f}%" in result.output
    result = runner.invoke(app, ["compare", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "no record" in result.output


def test_console_is_wide_in_logs_unless_columns_says_otherwise(monkeypatch):
    from attndrift.console import _console

    monkeypatch.delenv("COLUMNS", raising=False)
    assert not _console().is_terminal and _console().width == 160  # pytest captures: a pipe
    monkeypatch.setenv("COLUMNS", "100")
    assert _console().width == 100


@pytest.mark.parametrize(("args", "needle"), [
    (["--workers", "2", "--gpus", "99"], "99 not among the visible GPUs"),
    (["--gpus", "0"], "needs --backend local and --workers 2"),
])
def test_study_gpus_are_checked_before_anything_runs(tmp_path, args, needle):
    study = ROOT / "configs" / "studies" / "demo.yaml"
    result = runner.invoke(app, ["study", "run", str(study), "--store", str(tmp_path / "s"),
                                 *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --gpus") and needle in lines[0]
    assert not (tmp_path / "s").exists()
