"""Tables from hand-made records: what each table holds, how runs group into settings, and that
failed, diverged, corrupt and missing runs are shown, not dropped and not crashing anything."""

import csv
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from attndrift.analysis import all_tables, load_store, supplementary, tables
from attndrift.analysis.table import to_markdown, write_csv
from attndrift.signals import ATTENTION

METRIC_NAMES = tuple(ATTENTION)  # every registered attention metric (attndrift.signals)
# How strongly each metric follows the entropy drift in the fake records (gini moves opposite),
# and its pretrained value (entropy: 2.5 + 0.1 per layer).
_FOLLOW = {"entropy": 1.0, "erf": 1.5, "gini": -3.0, "head_diversity": 0.5}
_BASE = {"erf": 0.6, "gini": 0.3, "head_diversity": 0.1, "attention_distance": 1.5}


def _block(layers: dict[str, list[float]], heads: int) -> dict:
    out = {m: {"layers": v, **({"heads": [[x] * heads for x in v]} if ATTENTION[m].per_head
                               else {})} for m, v in layers.items()}
    out["mean"] = {m: float(np.mean(v)) for m, v in layers.items()}
    return out


def fake_record(*, name: str = "run", method: str = "full_ft", lr: float = 1e-3, seed: int = 0,
                dataset: str = "shapes-layout", drift: float = -5.0, status: str = "completed",
                regularizer: dict | None = None, n_layers: int = 4, heads: int = 4,
                probes: int = 4, aux: dict | None = None, acc: float = 0.9,
                zs_after: float = 0.5, weight_decay: float = 0.01) -> dict:
    """A schema-valid record whose layer-mean entropy drifts by about ``drift`` %."""
    rng = np.random.default_rng(zlib.crc32(f"{name}/{seed}/{lr}/{method}".encode()))
    base = {"entropy": 2.5 + 0.1 * np.arange(n_layers),
            **{m: np.full(n_layers, _BASE.get(m, 0.5)) for m in METRIC_NAMES if m != "entropy"}}

    def at(fraction: float) -> dict[str, list[float]]:
        return {m: list(b * (1 + fraction * _FOLLOW.get(m, 1.0) * drift / 100
                             * (1 + 0.2 * rng.standard_normal(n_layers)))) for m, b in
                base.items()}

    config = {"name": name, "seed": seed, "model": "tiny", "method": method, "freeze_layers": 0,
              "lora": {"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
              "train": {"epochs": 2, "max_steps": None, "batch_size": 32, "lr": lr,
                        "weight_decay": weight_decay, "warmup_frac": 0.05, "grad_clip": 1.0,
                        "precision": "auto", "flip": True, "log_every": 5},
              "data": {"dataset": dataset, "zeroshot": ["shapes-zs-shape"], "val_frac": 0.2,
                       "split_seed": 42, "train_limit": 320, "eval_batch_size": 256},
              "probe": {"per_epoch": 2, "images": 40, "seed": 42, "batch_size": 64},
              "device": "cpu", "save_checkpoints": True}
    if regularizer is not None:
        config["regularizer"] = regularizer
    baseline = _block({m: list(b) for m, b in base.items()}, heads)
    history = {"probes": [{"step": 5 * (i + 1), "epoch": (i + 1) / 2, "fraction": (i + 1) / probes,
                           "metrics": _block(at((i + 1) / probes), heads)}
                          for i in range(probes)],
               "epochs": [{"epoch": 1, "step": 10, "val_acc": acc - 0.05},
                          {"epoch": 2, "step": 20, "val_acc": acc}],
               "loss": [{"step": 5 * i, "loss": 2.0 / i, "lr": lr} for i in range(1, 5)]}
    record = {"schema_version": 1, "run_id": f"{name}-{seed:08x}", "status": status,
              "config": config,
              "provenance": {"attndrift": "0.1.0", "python": "3.11.2", "torch": "2.13.0+cpu",
                             "transformers": "5.23.0", "peft": "0.18.0", "device": "cpu",
                             "gpu": None, "platform": "Linux", "git_commit": "abc123"},
              "baseline": baseline, "history": history, "final": {}, "zeroshot": {},
              "timing": {"total_s": 7.5}}
    if status != "completed":
        record["error"] = "RuntimeError: boom" if status == "failed" else "loss became nan"
        return record
    fin = history["probes"][-1]["metrics"]
    record["final"] = {
        "step": 20, "epochs": 2.0, "val_acc": acc, "best_val_acc": acc, "best_epoch": 2,
        "test_acc": acc - 0.01, "train_loss": 0.5, "metrics": fin,
        "delta_pct": {m: 100 * (fin["mean"][m] - baseline["mean"][m]) / baseline["mean"][m]
                      for m in METRIC_NAMES},
        "delta_pct_layers": {m: [100 * (a - b) / b for a, b in
                                 zip(fin[m]["layers"], baseline[m]["layers"], strict=True)]
                             for m in METRIC_NAMES}}
    # the other probe subsets drifted 0.1 points less than subset 0 (tests tell them apart)
    record["final"]["delta_pct_subset_mean"] = {m: v - 0.1 for m, v in
                                                record["final"]["delta_pct"].items()}
    if aux is not None:
        record["final"]["aux"] = aux
    record["zeroshot"] = {"shapes-zs-shape": {"before": 0.8, "after": zs_after,
                                              "retention_pct": 100 * zs_after / 0.8,
                                              "chance": 1 / 6, "classes": 6}}
    # zero-shot tracked during training (probe.zeroshot_every), falling linearly to zs_after
    baseline["zeroshot_subset"] = {"shapes-zs-shape": 0.8}
    for p in history["probes"]:
        p["zeroshot"] = {"shapes-zs-shape": 0.8 + (zs_after - 0.8) * p["fraction"]}
    return record


def write_store(root: Path, records: dict[str, dict]) -> Path:
    for name, rec in records.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "record.json").write_text(json.dumps(rec))
    return root


def matched_store(root: Path, seeds: int = 3) -> Path:
    """2 methods x 3 lrs x `seeds` seeds on one dataset, plus a regularizer family, a failed,
    a diverged, a corrupt and a half-written run."""
    recs = {}
    for method, slope in (("full_ft", -4.0), ("lora", 0.5)):
        for k, lr in enumerate((1e-4, 1e-3, 1e-2)):
            for s in range(seeds):
                drift = slope * (k + 1) + 0.3 * s
                recs[f"{method}_{lr:g}_{s}"] = fake_record(
                    name=f"{method}_{lr:g}", method=method, lr=lr, seed=s, drift=drift,
                    zs_after=max(0.05, 0.8 + drift / 20))
    for lam, drift in ((0.01, -1.0), (0.1, 0.5)):
        for s in range(seeds):
            recs[f"apr_{lam}_{s}"] = fake_record(
                name=f"apr_{lam}", lr=1e-3, seed=s, drift=drift + 0.2 * s,
                regularizer={"name": "apr", "lam": lam},
                aux={"rollout_entropy": 3.1, "cka_cls": [0.9, 0.8, 0.7, 0.6],
                     "subset_cv": {"entropy": 0.001}})
    recs["failed"] = fake_record(name="failed", status="failed", lr=1e-1)
    recs["diverged"] = fake_record(name="diverged", status="diverged", lr=1e-1, probes=2)
    write_store(root, recs)
    (root / "corrupt").mkdir()
    (root / "corrupt" / "record.json").write_text('{"schema_version": 1, "run_')
    (root / "half").mkdir()
    (root / "half" / ".record.json.x1y2.tmp").write_text("{")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return matched_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def built(store) -> dict:
    """Every table of the store, built once (the inferential ones take a moment)."""
    return {t.name: t for t in all_tables(load_store(store), str(store))}


def _rows(table, **where):
    return [r for r in table.rows if all(r.get(k) == v for k, v in where.items())]


def test_store_loading_shows_every_run_with_its_status(store):
    runs = load_store(store)
    status = {r.path.name: r.status for r in runs}
    assert status["failed"] == "failed" and status["diverged"] == "diverged"
    assert status["corrupt"] == "corrupt" and status["half"] == "missing"
    assert "half-written" in next(r.error for r in runs if r.path.name == "half")
    assert sum(s == "completed" for s in status.values()) == 24
    table = tables.run_status(runs, str(store))
    assert len(table.rows) == len(runs) == 28
    assert _rows(table, dir="failed")[0]["error"] == "RuntimeError: boom"
    # these directories are not named by their run ids, so the ids get a column
    assert "run_id" in [c.key for c in table.columns]


def test_run_status_shows_no_run_id_column_that_repeats_the_directory(tmp_path):
    recs = {f"lora_{s}": fake_record(name="lora", method="lora", seed=s) for s in range(2)}
    recs = {rec["run_id"]: rec for rec in recs.values()}  # a study names directories by id
    runs = load_store(write_store(tmp_path, recs))
    table = tables.run_status(runs, str(tmp_path))
    assert len(table.rows) == 2 and "run_id" not in [c.key for c in table.columns]
    assert "named by its run id" in table.caption


def test_main_comparison_holds_completed_runs_only(store):
    table = tables.main_comparison(load_store(store))
    assert len(table.rows) == 24
    row = _rows(table, run="full_ft_0.01", seed=0)[0]
    assert row["method"] == "full FT" and row["regularizer"] == "none"
    assert row["d_entropy"] == pytest.approx(-12.0, abs=2.5)
    assert row["zs_shapes-zs-shape"] == pytest.approx(0.2, abs=0.15)
    assert _rows(table, run="apr_0.01", seed=0)[0]["regularizer"] == "APR λ=0.01"


def test_matched_lr_aggregates_seeds_and_counts_failures(store):
    runs = load_store(store)
    table = tables.matched_lr(runs)
    row = _rows(table, method="full FT", lr=1e-3, regularizer="none")[0]
    members = [r for r in tables.main_comparison(runs).rows
               if r["run"] == "full_ft_0.001"]
    vals = [r["d_entropy"] for r in members]
    assert row["n"] == 3 and row["not_completed"] == 0
    assert row["d_entropy"] == pytest.approx(np.mean(vals))
    assert row["d_entropy_sd"] == pytest.approx(np.std(vals, ddof=1))
    failed = _rows(table, lr=0.1)[0]  # a setting none of whose runs completed is shown as such
    assert (failed["n"], failed["not_completed"]) == (0, 2) and math.isnan(failed["d_entropy"])
    status = tables.run_status(runs, str(store))
    assert {r["status"] for r in _rows(status, lr=0.1)} == {"failed", "diverged"}


def test_lr_sweep_and_regularization_tables(store):
    runs = load_store(store)
    sweep = tables.lr_sweep(runs)
    assert sorted({r["lr"] for r in _rows(sweep, method="full FT", regularizer="none")}) == [
        1e-4, 1e-3, 1e-2, 1e-1]
    assert _rows(sweep, lr=1e-1)[0]["not_completed"] == 2
    reg = tables.regularization(runs)
    assert {r["regularizer"] for r in reg.rows} == {"none", "APR λ=0.01", "APR λ=0.1"}
    assert {r["lr"] for r in reg.rows} == {1e-3}


def test_auxiliary_table_shows_only_recorded_metrics(store, tmp_path):
    table = supplementary.auxiliary(load_store(store))
    keys = [c.key for c in table.columns]
    assert "rollout_entropy" in keys and "cka_cls" in keys and "subset_cv_entropy" in keys
    assert "p2p_entropy" not in keys
    row = _rows(table, run="apr_0.01", seed=0)[0]
    assert row["cka_cls"] == pytest.approx(0.75)
    plain = write_store(tmp_path, {"a": fake_record()})
    assert supplementary.auxiliary(load_store(plain)).skipped


def test_lr_trend_reproduces_a_perfectly_monotone_sweep(built):
    table = built["inference"]
    trend = [r for r in table.rows if r["family"] == "lr trend (spearman)"
             and "full FT" in r["comparison"]]
    assert len(trend) == 1
    # 3 learning rates, drift falling with lr: rho = -1, exact p = 2/3! (both perfect orders)
    assert trend[0]["statistic"] == pytest.approx(-1.0)
    assert trend[0]["p"] == pytest.approx(2 / 6)
    assert trend[0]["level"].startswith("setting-level")
    per_layer = [r for r in table.rows if r["family"] == "regularizer, per layer"]
    assert per_layer and all(r["level"].startswith("exploratory") for r in per_layer)
    assert all(r["p_holm"] >= r["p"] for r in per_layer)


def test_run_level_contrasts_are_one_factor_and_seed_based(built):
    table = built["run_level"]
    factors = {r["factor"] for r in table.rows}
    assert factors == {"method", "regularizer"}
    row = next(r for r in table.rows if r["factor"] == "method"
               and r["where"] == "tiny · shapes-layout · lr 1e-3" and r["outcome"] == "Δ entropy %")
    assert (row["a"], row["b"], row["n"]) == ("full FT", "LoRA r=8 α=16", "3 vs 3")
    assert row["p"] < 0.05 and row["p_holm"] >= row["p"] and row["d"] < 0


def test_collapse_onset_table_includes_diverged_runs(store):
    table = supplementary.collapse_onsets(load_store(store))
    assert _rows(table, run="diverged")[0]["status"] == "diverged"
    steep = _rows(table, run="full_ft_0.01", seed=0)[0]
    assert steep["onset"] == pytest.approx(0.25)  # first probe is already below -1%
    assert _rows(table, run="lora_0.0001", seed=0)[0]["onset"] == "never"


def test_every_table_renders_and_writes_csv(built, tmp_path):
    for table in built.values():
        assert table.rows or table.skipped, table.name
        assert not (table.skipped or "").startswith("error"), table.skipped
        if table.empty:
            continue
        md = to_markdown(table)
        assert md.count("\n") == len(table.rows) + 1
        write_csv(table, tmp_path / f"{table.name}.csv")
        with open(tmp_path / f"{table.name}.csv") as fh:
            rows = list(csv.reader(fh))
        assert len(rows) == len(table.rows) + 1


def test_empty_and_unreadable_stores_do_not_crash(tmp_path):
    assert [t.name for t in all_tables([], "") if not t.empty] == []
    write_store(tmp_path, {"only_failed": fake_record(status="failed")})
    out = {t.name: t for t in all_tables(load_store(tmp_path), str(tmp_path))}
    assert len(out["runs"].rows) == 1 and out["main_comparison"].skipped == "no completed runs"
    assert all(not (t.skipped or "").startswith("error") for t in out.values())


def test_nan_and_missing_values_render_as_not_available(tmp_path):
    rec = fake_record()
    rec["final"]["delta_pct_subset_mean"]["gini"] = None
    rec["zeroshot"]["shapes-zs-shape"]["retention_pct"] = None
    table = tables.main_comparison(load_store(write_store(tmp_path, {"a": rec})))
    assert "| n/a |" in to_markdown(table)
    assert math.isnan(table.rows[0]["d_gini"])
    assert not math.isnan(tables.main_comparison(load_store(tmp_path), drift="subset0")
                          .rows[0]["d_gini"])


def test_settings_sort_case_insensitively_and_seeds_numerically(tmp_path):
    recs = {f"{d}_{s}": fake_record(name=d, dataset=d, seed=s)
            for d in ("Zeta", "alpha", "Beta") for s in (19, 7, 11)}
    runs = load_store(write_store(tmp_path, recs))
    table = tables.matched_lr(runs)
    assert [r["dataset"] for r in table.rows] == ["alpha", "Beta", "Zeta"]
    assert {r["seeds"] for r in table.rows} == {"7, 11, 19"}
    main = tables.main_comparison(runs)
    assert [r["seed"] for r in main.rows[:3]] == [7, 11, 19]


def test_every_table_is_registered_once_under_its_own_name(store):
    from attndrift.analysis import SECTIONS, table_specs

    specs = table_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names)) and {s.section for s in specs} <= {
        s.id for s in SECTIONS}
    runs = load_store(store)
    for spec in specs:  # the CSV stem a builder writes is the name it is registered under
        extra = {"store_root": str(store)} if spec.store else {}
        assert spec.build(runs, **extra).name == spec.name
    assert [t.name for t in all_tables(runs)] == names


def test_records_without_subset_means_are_read_on_subset_0(tmp_path):
    recs = {f"a_{s}": fake_record(name="a", seed=s) for s in range(2)}
    for rec in recs.values():
        del rec["final"]["delta_pct_subset_mean"]
    out = {t.name: t for t in all_tables(load_store(write_store(tmp_path, recs)))}
    row = out["matched_lr"].rows[0]
    assert row["d_entropy"] == pytest.approx(
        np.mean([r["final"]["delta_pct"]["entropy"] for r in recs.values()]))
    assert "subset 0" in out["matched_lr"].caption
