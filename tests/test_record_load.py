"""Records read from disk are validated once, in `read_record`: anything unreadable or of the
wrong type is a corrupt record with the field named, and every reader (study run and status,
compare, report) handles it as corrupt instead of crashing (issue 24 items 7-8)."""

import copy
import json
import shutil

import pytest
from typer.testing import CliRunner

from attndrift.cli import app
from attndrift.records import (
    RecordError,
    RunRecord,
    evaluated_checkpoint,
    read_record,
    write_record,
)
from conftest import ROOT

runner = CliRunner()
DEEP = "[" * 100000 + "]" * 100000

# (edit of a real record, the field the error must name)
WRONG_TYPES = [
    ((["config", "train", "lr"], "fast"), "config.train.lr"),
    ((["config", "seed"], [1]), "config.seed"),
    ((["config", "train"], "x"), "config.train"),
    ((["config", "method"], 7), "config.method"),
    ((["final", "delta_pct_layers", "entropy"], "x"), "final.delta_pct_layers.entropy"),
    ((["config", "lora", "targets"], "q_proj"), "config.lora.targets"),
    ((["baseline", "entropy", "layers"], ["a"]), "baseline.entropy.layers.0"),
    ((["history", "probes", 0, "metrics", "mean", "gini"], "x"),
     "history.probes.0.metrics.mean.gini"),
    ((["final", "evaluated"], "best"), "final.evaluated"),
    ((["warnings"], "check names"), "warnings"),
    ((["guard"], 5), "guard"),
]


def _edited(record: dict, path: list, value) -> dict:
    out = copy.deepcopy(record)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@pytest.mark.parametrize(("edit", "field"), WRONG_TYPES)
def test_wrong_typed_fields_are_corrupt_with_the_field_named(tmp_path, full_ft_run, edit, field):
    good = json.loads((full_ft_run / "record.json").read_text())
    (tmp_path / "record.json").write_text(json.dumps(_edited(good, *edit)))
    with pytest.raises(RecordError, match="corrupt record") as info:
        read_record(tmp_path)
    assert f"{field} is" in str(info.value)


def test_deep_nesting_is_corrupt_not_a_recursion_error(tmp_path):
    (tmp_path / "record.json").write_text(DEEP)
    with pytest.raises(RecordError, match="nested too deeply"):
        read_record(tmp_path)


def test_the_typed_record_round_trips_a_real_one_and_old_records_still_load(tmp_path,
                                                                          full_ft_run):
    record = read_record(full_ft_run)
    assert RunRecord.from_json(record).to_json() == record
    assert list(record) == list(RunRecord.from_json(record).to_json())  # on-disk key order
    assert evaluated_checkpoint(record) == "final"
    assert record["final"]["evaluated"] == {"checkpoint": "final", "epoch": 1, "step": 10}
    # a record of the version before `final.evaluated` and `eval` existed: final weights
    old = copy.deepcopy(record)
    del old["final"]["evaluated"]
    write_record(tmp_path / "record.json", old)
    assert evaluated_checkpoint(read_record(tmp_path)) == "final"
    # a method this version does not know still reads (choices are checked as strings)
    write_record(tmp_path / "record.json", _edited(record, ["config", "method"], "dora_v9"))
    assert read_record(tmp_path)["config"]["method"] == "dora_v9"


def test_compare_and_report_list_every_bad_record_and_report_the_rest(tmp_path, full_ft_run):
    store = tmp_path / "store"
    shutil.copytree(full_ft_run, store / "good")
    good = json.loads((full_ft_run / "record.json").read_text())
    bad = {"deep": DEEP}
    for i, (edit, _) in enumerate(WRONG_TYPES[:5]):
        bad[f"bad{i}"] = json.dumps(_edited(good, *edit))
    for name, text in bad.items():
        (store / name).mkdir()
        (store / name / "record.json").write_text(text)
    result = runner.invoke(app, ["compare", str(store / "good"), *(str(store / n) for n in bad)])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())  # rich wraps long lines
    assert "nested too deeply" in flat and "good" in flat
    for _, field in WRONG_TYPES[:5]:
        assert field in flat
    result = runner.invoke(app, ["report", str(store), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert f"{len(bad)} corrupt" in result.output and (tmp_path / "rep" / "report.md").is_file()


def test_study_status_shows_a_deeply_nested_record_corrupt_and_study_run_redoes_it(tmp_path):
    from attndrift.study.spec import load_study
    from attndrift.study.store import Store

    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({  # JSON is YAML; one run of 2 steps
        "name": "s", "base": str(ROOT / "configs" / "runs" / "tiny_full_ft.yaml"),
        "set": {"train.epochs": 1, "data.train_limit": 64, "train.batch_size": 32,
                "probe.per_epoch": 1, "probe.images": 16, "data.zeroshot": ["shapes-zs-shape"]},
        "runs": [{"name": "a"}]}))
    store = tmp_path / "store"
    _, planned = load_study(study)
    run_dir = Store(store).run_dir(planned[0].run_id)
    run_dir.mkdir(parents=True)
    (run_dir / "record.json").write_text(DEEP)
    result = runner.invoke(app, ["study", "run", str(study), "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert read_record(run_dir)["status"] == "completed"
    (run_dir / "record.json").write_text(DEEP)
    result = runner.invoke(app, ["study", "status", "--store", str(store), "--json"])
    rows = json.loads(result.output)["runs"]
    assert [r["status"] for r in rows] == ["corrupt"] and "nested too deeply" in rows[0]["error"]


def test_a_deeply_nested_or_broken_manifest_does_not_stop_loading_the_store(tmp_path, full_ft_run):
    """The store's study.json nested past the parser's depth (or not JSON at all): the runs on
    disk are still found and the report is written, no RecursionError traceback."""
    from attndrift.analysis import load_store
    from attndrift.analysis.runs import MANIFEST_FILE

    store = tmp_path / "store"
    shutil.copytree(full_ft_run, store / "good")
    for text in (DEEP, '{"runs": [', "[1, 2]"):
        (store / MANIFEST_FILE).write_text(text)
        assert [r.status for r in load_store(store)] == ["completed"]
    result = runner.invoke(app, ["report", str(store), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
