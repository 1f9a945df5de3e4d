"""The CLI as users meet it: conventional help and flags, and hostile or mistaken input
answered with one line and exit 2 (issues 22.8-22.10, 24.3-24.6, 24.9, 24.11, 24.12, 24.14)."""

import json
import time

import pytest
import typer
from typer.testing import CliRunner

from attndrift.cli import app
from attndrift.config import ConfigError, load_config
from attndrift.study.spec import load_study
from attndrift.study.store import Store, claim
from attndrift.yamlio import MAX_VALUES, YamlError, parse_yaml
from conftest import ROOT

runner = CliRunner()
TINY_FT = str(ROOT / "configs" / "runs" / "tiny_full_ft.yaml")


def lines(output: str) -> list[str]:
    return [line for line in output.strip().splitlines() if line.strip()]


def one_error(result, needle: str, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    (line,) = lines(result.output)
    assert line.startswith("error:") and needle in line, line
    return line


# --- 22.8: looks and behaves like a click/typer CLI --------------------------------------

def test_help_is_conventional():
    for args in (["-h"], ["run", "-h"], ["validate", "--help"], ["study", "run", "-h"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        for odd in ("<bool>", "<list[", "{config}", "{configs}", "<path>"):
            assert odd not in result.output, (args, odd)
    usage = runner.invoke(app, ["run", "-h"]).output
    assert "run [OPTIONS] CONFIG [KEY=VALUE...]" in usage and "--set" in usage
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("attndrift 0.")


@pytest.mark.parametrize("args", [
    ["run", TINY_FT, "train.lrr=1", "--quiet=true"],  # a flag given a value, as many tools allow
    ["run", TINY_FT, "--set", "train.lrr=1", "--quiet=false"],  # --set as in validate
    ["validate", TINY_FT, "train.lrr=1"],  # positional, as in run
    ["validate", TINY_FT, "--set", "train.lrr=1"],
])
def test_overrides_in_both_forms_and_flags_with_values(args):
    one_error(runner.invoke(app, args), "unknown key 'train.lrr'")


def test_device_defaults_agree():
    command = typer.main.get_command(app)
    defaults = {name: p.default for name, cmd in command.commands.items() for p in cmd.params
                if p.name == "device"}
    assert set(defaults) >= {"interpolate", "measure"} and set(defaults.values()) == {"auto"}


# --- 22.9 / 22.10: errors that say the fix; validate reports every file -----------------

def test_quoted_number_says_remove_the_quotes():
    line = one_error(runner.invoke(app, ["validate", TINY_FT, 'train.lr="1e-4"']), "train.lr")
    assert "remove the quotes" in line


def test_validate_reports_every_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: full_ft\ntrain: {lr: fast}\n")
    hub = str(ROOT / "configs" / "runs" / "eurosat_full_ft.yaml")  # not cached; offline here
    result = runner.invoke(app, ["validate", hub, str(bad), TINY_FT])
    assert result.exit_code == 2
    out = result.output
    assert "needs the hub" in out and "eurosat_full_ft.yaml" in out
    assert "train.lr" in out and f"ok {TINY_FT}" in out
    assert "1 ok, 1 valid but need the hub, 1 invalid" in out
    result = runner.invoke(app, ["validate", hub, TINY_FT])
    assert result.exit_code == 0 and "needs the hub" in result.output


def test_compare_a_store_compares_its_runs(tmp_path, full_ft_run, lora_run):
    store = tmp_path / "store"
    (store / "runs").mkdir(parents=True)
    for run in (full_ft_run, lora_run):
        (store / "runs" / run.name).symlink_to(run)
    result = runner.invoke(app, ["compare", str(store)])
    assert result.exit_code == 0, result.output
    assert full_ft_run.name in result.output and lora_run.name in result.output
    (tmp_path / "empty").mkdir()
    one_error(runner.invoke(app, ["compare", str(tmp_path / "empty")]), "no run directories", 1)


# --- 24.3 / 24.4: one process per run directory, names that stay inside runs/ ------------

def test_run_refuses_a_directory_another_process_is_running(tmp_path):
    out = tmp_path / "r"
    with claim(out):  # what a second `run --out r` or a study worker holds
        result = runner.invoke(app, ["run", TINY_FT, "train.max_steps=1", "--out", str(out)])
    one_error(result, "being run by another process", 1)
    assert not (out / "record.json").exists()


@pytest.mark.parametrize(("name", "needle"), [
    ("../../../escaped", "contains '/'"), ("x" * 300, "300 bytes"), (".hidden", "'.'")])
def test_unsafe_names_are_refused(tmp_path, monkeypatch, name, needle):
    monkeypatch.chdir(tmp_path)
    one_error(runner.invoke(app, ["run", TINY_FT, f"name={name}"]), needle)
    assert list(tmp_path.iterdir()) == []  # nothing written, inside runs/ or outside it
    spec_bad = tmp_path / "long.yaml"
    spec_bad.write_text(json.dumps({"name": "s", "base": TINY_FT, "runs": [{"name": "x" * 300}]}))
    one_error(runner.invoke(app, ["study", "plan", str(spec_bad)]), "300 bytes")


def test_long_grid_ids_are_cut_to_a_directory_name(tmp_path):
    study = tmp_path / "g.yaml"
    study.write_text(json.dumps({"name": "g", "base": TINY_FT, "grids": [{
        "name": "g", "axes": {"data.zeroshot": [["shapes-zs-shape"] * 40]}}]}))
    _, (run,) = load_study(study)
    assert len(run.run_id.encode()) < 140


# --- 24.5 / 24.6: bounded work on hostile input -----------------------------------------

def bomb(levels: int) -> str:
    text = 'a0: &a0 ["x","x","x","x","x","x","x","x","x"]\n'
    for i in range(1, levels + 1):
        text += f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]\n"
    return text


def test_alias_bomb_is_refused_in_bounded_time(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb(9))
    assert len(path.read_bytes()) < 600
    t0 = time.perf_counter()
    line = one_error(runner.invoke(app, ["validate", str(path)]), f"{MAX_VALUES:,} values")
    assert time.perf_counter() - t0 < 5 and len(line) < 300
    study = tmp_path / "s.yaml"
    study.write_text(bomb(9) + "name: s\nruns: [{name: a}]\n")
    one_error(runner.invoke(app, ["study", "plan", str(study)]), f"{MAX_VALUES:,} values")
    with pytest.raises(YamlError, match="contains it"):
        parse_yaml("a: &a [1, *a]\n")
    assert parse_yaml("x: &x {r: 4}\ny: *x\n") == {"x": {"r": 4}, "y": {"r": 4}}  # still fine


def test_errors_never_print_a_whole_value(tmp_path):
    # a depth-3 bomb (7,381 values) is under the bound: the type error must not quote it all
    path = tmp_path / "big.yaml"
    path.write_text(bomb(3) + "method: full_ft\ntrain: {lr: *a3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.lr" in str(err.value) and len(str(err.value)) < 400


def test_study_size_is_capped_before_expanding(tmp_path):
    study = tmp_path / "huge.yaml"
    study.write_text(json.dumps({"name": "huge", "base": TINY_FT, "grids": [{
        "name": "g", "axes": {"seed": list(range(1000)), "train.lr": [1e-4] * 1000}}]}))
    t0 = time.perf_counter()
    line = one_error(runner.invoke(app, ["study", "plan", str(study)]), "1,000,000 runs")
    assert "--max-runs" in line and time.perf_counter() - t0 < 5
    small = tmp_path / "small.yaml"
    small.write_text(json.dumps({"name": "small", "base": TINY_FT, "grids": [{
        "name": "g", "axes": {"seed": [0, 1, 2]}}]}))
    one_error(runner.invoke(app, ["study", "plan", str(small), "--max-runs", "2"]), "3 runs")
    assert runner.invoke(app, ["study", "plan", str(small), "--max-runs", "3"]).exit_code == 0


# --- 24.9 / 24.12: one line, exit 2 -----------------------------------------------------

def test_malformed_yaml_is_one_line(tmp_path):
    one_error(runner.invoke(app, ["run", TINY_FT, "--set", "train.lr=[1"]), "not valid YAML")
    study = tmp_path / "s.yaml"
    study.write_text("name: s\ngrids:\n  - name: g\n    axes: {seed: [0, 1}\n")
    one_error(runner.invoke(app, ["study", "plan", str(study)]), "line 4")
    for base in ("- 1\n- 2\n", "? [a, b]\n: 1\n"):
        (tmp_path / "base.yaml").write_text(base)
        study.write_text("name: s\nbase: base.yaml\nruns: [{name: a}]\n")
        one_error(runner.invoke(app, ["study", "plan", str(study)]), "base")


def test_one_probe_image_is_refused_up_front():
    one_error(runner.invoke(app, ["validate", TINY_FT, "probe.images=1"]), "CKA")
    assert runner.invoke(app, ["validate", TINY_FT, "probe.images=1", "probe.aux=[rollout]"]
                         ).exit_code == 0


# --- 24.11: user strings are never rich markup ------------------------------------------

def test_markup_in_names_prints_literally(tmp_path, capsys):
    from attndrift.cli import _print_run

    record = {"run_id": "x[/]y-1234abcd", "status": "completed", "warnings": ["w [/] [red]"],
              "timing": {"total_s": 1.0}, "zeroshot": {"t[/]": {"before": 0.5, "after": 0.4}},
              "final": {"best_val_acc": 0.9, "test_acc": 0.8, "delta_pct": {"entropy": 1.0}}}
    _print_run(record, tmp_path / "[bold]x[/]")
    captured = capsys.readouterr()
    assert "x[/]y-1234abcd" in captured.out and "[bold]x[/]" in captured.out
    assert "w [/] [red]" in captured.err


def test_compare_tables_print_run_names_literally():
    import io

    from rich.console import Console

    from attndrift.compare import comparison_tables

    record = {"run_id": "x[/]y-1", "status": "completed", "config": {"method": "full_ft"},
              "final": {"delta_pct_layers": {"entropy": [1.0]}}, "zeroshot": {}}
    console = Console(file=io.StringIO(), width=200)
    for table in comparison_tables([record]):
        console.print(table)
    assert "x[/]y-1" in console.file.getvalue()


# --- 24.14: study status reads only ------------------------------------------------------

def test_status_reads_only_and_reports_what_it_cannot_read(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({"name": "s", "base": TINY_FT,
                                 "runs": [{"name": "a"}, {"name": "b", "set": {"seed": 1}}]}))
    _, planned = load_study(study)
    store = Store(tmp_path / "store")
    store.root.mkdir()
    store.write_manifest("s", planned)
    with claim(store.run_dir(planned[1].run_id)):  # a worker holds b
        before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
        result = runner.invoke(app, ["study", "status", "--store", str(store.root), "--json"])
    assert result.exit_code == 0, result.output
    statuses = {r["run_id"]: r["status"] for r in json.loads(result.output)["runs"]}
    assert statuses == {planned[0].run_id: "pending", planned[1].run_id: "running"}
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before
    manifest = store.root / "study.json"
    for broken in (manifest.read_text()[:100], "[]", '{"runs": [{"id": 1}]}'):
        manifest.write_text(broken)
        one_error(runner.invoke(app, ["study", "status", "--store", str(store.root)]),
                  "study.json")


def test_report_early_fraction_outside_training_is_one_line(tmp_path):
    for bad in ("1.5", "0", "-0.2"):
        result = CliRunner().invoke(app, ["report", str(tmp_path), "--early-fraction", bad,
                                          "--out", str(tmp_path / "r")])
        one_error(result, "between 0 and 1")
    assert not (tmp_path / "r").exists()
