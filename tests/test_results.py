"""Results as data (issue 22 item 13): every table and a run's history as pandas DataFrames,
holding the same raw values as the report's CSV files."""

import csv
import math

import pandas as pd
import pytest

import attndrift
from attndrift.analysis import write_csv
from test_tables import matched_store


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return attndrift.load_store(matched_store(tmp_path_factory.mktemp("store"), seeds=2))


def test_every_table_is_a_dataframe_with_the_csv_values(results, tmp_path):
    assert "matched_lr" in results.names and "runs" in results.names
    for table in results:
        df = table.to_pandas()
        assert isinstance(df, pd.DataFrame) and df.attrs["title"] == table.title
        assert len(df) == len(table.rows)
        if table.empty:
            assert df.attrs["skipped"]
            continue
        write_csv(table, tmp_path / f"{table.name}.csv")
        with open(tmp_path / f"{table.name}.csv") as fh:
            rows = list(csv.reader(fh))
        assert rows[0] == list(df.columns)
        for got, want in zip(df.itertuples(index=False), rows[1:], strict=True):
            for g, w in zip(got, want, strict=True):
                if w == "":
                    assert g in (None, "") or (isinstance(g, float) and math.isnan(g))
                elif isinstance(g, float):
                    assert g == float(w)
                else:
                    assert str(g) == w


def test_matched_lr_dataframe_is_the_seed_mean(results):
    df = results["matched_lr"].to_pandas()
    done = [r for r in results.runs if r.ok and "regularizer" not in r.config]
    checked = 0
    for _, row in df[(df.regularizer == "none") & (df.n > 0)].iterrows():
        method = "lora" if row["method"].startswith("LoRA") else "full_ft"
        seeds = [r for r in done
                 if r.config["method"] == method and r.config["train"]["lr"] == row["lr"]]
        want = sum(r.record["final"]["test_acc"] for r in seeds) / len(seeds)
        assert row["test_acc"] == pytest.approx(want, rel=1e-12) and row["n"] == len(seeds)
        checked += 1
    assert checked == 6


def test_unknown_table_names_the_known_ones(results):
    with pytest.raises(KeyError, match="matched_lr"):
        results["nope"]


def test_a_runs_history_as_dataframes(results):
    run = next(r for r in results.runs if r.ok)
    frames = results.history(run.path.name)
    probes, rec = frames["probes"], run.record["history"]
    assert list(probes["step"]) == [p["step"] for p in rec["probes"]]
    assert list(probes["entropy"]) == [p["metrics"]["mean"]["entropy"] for p in rec["probes"]]
    assert list(probes["zeroshot.shapes-zs-shape"]) == [p["zeroshot"]["shapes-zs-shape"]
                                                        for p in rec["probes"]]
    layers = frames["layers"]
    first = layers[(layers.step == rec["probes"][0]["step"]) & (layers.metric == "gini")]
    assert list(first["value"]) == rec["probes"][0]["metrics"]["gini"]["layers"]
    assert list(first["layer"]) == list(range(1, len(first) + 1))
    assert list(frames["epochs"]["val_acc"]) == [e["val_acc"] for e in rec["epochs"]]
    assert list(frames["loss"]["loss"]) == [e["loss"] for e in rec["loss"]]
