"""Run records: round-trip, atomic writes, and detection of corrupt or foreign files."""

import json
import math

import pytest

from attndrift.records import (
    SCHEMA_VERSION,
    RecordError,
    new_record,
    read_record,
    run_id_for,
    write_record,
)


def _record():
    rec = new_record("r-1", {"name": "r", "train": {"lr": 1e-4}})
    rec["status"] = "completed"
    rec["baseline"] = {"entropy": {"layers": [1.5, 2.0], "heads": [[1.0, 2.0], [2.0, 2.0]]}}
    rec["zeroshot"] = {"t": {"before": 0.9, "after": 0.5}}
    return rec


def test_round_trip(tmp_path):
    rec = _record()
    write_record(tmp_path / "record.json", rec)
    assert read_record(tmp_path) == json.loads(json.dumps(rec))
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temp files left


def test_non_finite_values_become_null(tmp_path):
    rec = _record()
    rec["final"] = {"train_loss": math.nan, "x": [1.0, math.inf]}
    write_record(tmp_path / "record.json", rec)
    assert read_record(tmp_path)["final"] == {"train_loss": None, "x": [1.0, None]}


def test_overwrite_is_atomic_and_keeps_previous_on_failure(tmp_path):
    path = tmp_path / "record.json"
    write_record(path, _record())
    bad = _record()
    bad["final"] = {"obj": object()}  # not JSON-serialisable: the write fails
    with pytest.raises(TypeError):
        write_record(path, bad)
    assert read_record(path)["status"] == "completed"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


@pytest.mark.parametrize(("content", "needle"), [
    ('{"schema_version": 1, "run_id": "x"', "corrupt"),
    ("[1, 2]", "not a JSON object"),
    ('{"schema_version": 99}', "schema_version 99"),
    (f'{{"schema_version": {SCHEMA_VERSION}, "run_id": "x"}}', "missing"),
])
def test_corrupt_records_are_detected(tmp_path, content, needle):
    (tmp_path / "record.json").write_text(content)
    with pytest.raises(RecordError, match=needle):
        read_record(tmp_path)


def test_missing_record(tmp_path):
    with pytest.raises(RecordError, match="no record"):
        read_record(tmp_path)


def test_run_id_is_stable_and_content_hashed():
    a = run_id_for({"name": "x", "lr": 1e-4, "seed": 1})
    assert a == run_id_for({"seed": 1, "lr": 1e-4, "name": "x"})
    assert a != run_id_for({"name": "x", "lr": 1e-4, "seed": 2})
    assert a.startswith("x-") and len(a) == len("x-") + 8
