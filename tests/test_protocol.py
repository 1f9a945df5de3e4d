"""The later protocol's evaluation choices end to end: per-class budgets with a disjoint probe
split, zero-shot per task, robustness on corrupted splits (published, read from a dataset on
disk in HF format; and generated); new keys at their defaults keep every existing run id."""

import numpy as np
import pytest
import torch
from PIL import Image

from attndrift.config import ConfigError, RunConfig, identity, load_config
from attndrift.data.registry import load_task
from attndrift.records import config_digest
from conftest import ROOT, tiny_config

PROTOCOL = ["data.budget={train: 20, val: 8, probe: 4}", "probe.images=40", "probe.subsets=2",
            "data.zeroshot_eval={shapes-zs-shape: {templates: paper21, images: 96, seed: 3}}",
            "data.robustness={corruptions: [contrast, gaussian_noise], severities: [2, 5], "
            "images: 60}"]


def test_new_keys_at_their_defaults_keep_existing_run_ids():
    # ids handed out before the budget, zero-shot, robustness and guard keys existed, with
    # the tracking cadence those runs had (probe.aux_every / zeroshot_every 0: before and after
    # training only). The default is now once per epoch (issue 23): a run that tracks the
    # signals records more and has a new id; the earlier default keeps the earlier ids.
    earlier = ["probe.aux_every=0", "probe.zeroshot_every=0"]
    assert config_digest(identity(load_config(None, earlier).model_dump(mode="json"))) == \
        "b1b96f18"
    for name, digest in (("tiny_full_ft", "7463aa0b"), ("tiny_lora", "19ec1c3e")):
        cfg = load_config(ROOT / "configs" / "runs" / f"{name}.yaml", earlier)
        assert config_digest(identity(cfg.model_dump(mode="json"))) == digest, name
    assert config_digest(identity(RunConfig().model_dump(mode="json"))) == "6d24bb48"
    used = load_config(None, [*earlier, "data.budget={train: 5, val: 2, probe: 2}"])
    assert config_digest(identity(used.model_dump(mode="json"))) != "b1b96f18"


@pytest.mark.parametrize(("override", "message"), [
    (["data.zeroshot_eval={shapes-zs-colour: {names: raw}}"], "not in data.zeroshot"),
    (["data.zeroshot_eval={shapes-zs-shape: {templates: nope}}"], "unknown template set"),
    (["data.robustness={splits: [contrast]}"], "publishes no corrupted split 'contrast'"),
    (["data.robustness={corruptions: [fog]}"], "unknown corruption 'fog'"),
    (["data.robustness={images: 10}"], "names no splits and no corruptions"),
])
def test_inconsistent_protocol_keys_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    from attndrift.train import run

    out = tmp_path_factory.mktemp("protocol")
    record = run(tiny_config("tiny_full_ft", *PROTOCOL), out, progress=False)
    return {**record, "_dir": out}


def test_a_budget_records_config_validates_again(protocol_run):
    # the resolved config holds val_frac (unused) next to the budget: resume, report and
    # interpolation re-validate it
    from attndrift.config import validate

    assert validate(protocol_run["config"]).data.budget.probe == 4


def test_budget_run_probes_a_split_disjoint_from_validation(protocol_run):
    from attndrift.data.splits import budget_split, index_fingerprint

    data = protocol_run["provenance"]["data"]
    labels = load_task("shapes-layout", "train").labels
    _, val, probe = budget_split(labels, 20, 8, 4, seed=42)  # data.split_seed
    assert set(val.tolist()).isdisjoint(probe.tolist())
    assert data["val_ids"] == index_fingerprint(val)
    assert data["probe_split_ids"] == index_fingerprint(probe)
    assert data["sizes"] == {"train": 200, "val": 80, "probe": 40}
    assert data["budget"] == {"train": 20, "val": 8, "probe": 4}


def test_zeroshot_per_task_is_recorded(protocol_run):
    shape, colour = (protocol_run["zeroshot"][n] for n in ("shapes-zs-shape", "shapes-zs-colour"))
    assert shape["prompt"]["templates"] == ["a photo of a {}"]
    assert shape["prompt"]["images"] == 96 and colour["prompt"]["images"] == 1020
    for z in (shape, colour):
        for key in ("top5", "mean_recall"):
            assert set(z[key]) == {"before", "after"}
            assert all(0.0 <= v <= 1.0 for v in z[key].values())
        assert z["top5"]["after"] >= z["after"]


def test_robustness_records_accuracy_per_corruption(protocol_run):
    rob = protocol_run["robustness"]
    names = ["contrast@2", "contrast@5", "gaussian_noise@2", "gaussian_noise@5"]
    assert list(rob["accuracy"]) == names
    assert all(rob["splits"][n]["images"] == 60 for n in names)
    assert len({rob["splits"][n]["content"] for n in names}) == 4
    mean = sum(rob["accuracy"].values()) / 4
    assert rob["mean"] == pytest.approx(mean)
    assert rob["test_acc"] == protocol_run["final"]["test_acc"]
    assert rob["gap"] == pytest.approx(rob["test_acc"] - mean)


def test_published_corrupted_split_is_read_from_a_hub_dataset_on_disk(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from attndrift.data.robustness import robustness_tasks

    monkeypatch.setenv("ATTNDRIFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ATTNDRIFT_DATA_ROOT", str(tmp_path / "mirror"))
    source = load_task("shapes-zs-colour", "test")
    names = source.class_names
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=names)})
    parts = {}
    for k, split in enumerate(("train", "test", "contrast")):
        idx = torch.cat([(source.labels == c).nonzero().flatten()[k * 10 : (k + 1) * 10]
                         for c in range(len(names))])  # 10 of each class per split
        pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in source.images[idx]]
        parts[split] = datasets.Dataset.from_dict(
            {"image": pil, "label": source.labels[idx].tolist()}, features=feats)
    # stored under the registered dataset's hub id: the code path of the real EuroSAT
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "mirror" / "tanganke" / "eurosat"))
    cfg = load_config(None, ["data.dataset=eurosat", "data.robustness={splits: [contrast]}"])
    assert cfg.data.robustness.splits == ["contrast"]
    test = load_task("eurosat", "test", image_size=32)
    tasks = robustness_tasks("eurosat", test, splits=["contrast"], corruptions=[],
                             severities=[3], images=30, seed=0, image_size=32)
    got = tasks["contrast"]
    assert len(got) == 30 and torch.bincount(got.labels).tolist() == [5] * 6
    published = torch.stack([torch.from_numpy(np.array(row["image"].convert("RGB")))
                             for row in parts["contrast"]]).permute(0, 3, 1, 2)
    assert all((published == im).flatten(1).all(1).any() for im in got.images)  # that split


def test_paper_presets_score_cifar100_with_the_papers_prompt():
    from attndrift.study.spec import load_study

    for name in ("paper21", "matched_lr80", "backbone", "followup"):
        _, planned = load_study(ROOT / "configs" / "studies" / f"{name}.yaml")
        for p in planned:
            z = p.config.data.zeroshot_eval["cifar100"]
            assert (z.templates, z.names, z.images) == ("paper21", "raw", None), p.run_id


def test_report_tables_show_robustness_and_the_extra_zeroshot_scores(protocol_run):
    from attndrift.analysis import all_tables, load_store, table_specs

    tables = {t.name: t for t in all_tables(load_store(protocol_run["_dir"]))}
    assert {s.name: s.section for s in table_specs()}["robustness"] == "results"
    rob = tables["robustness"]
    assert not rob.empty and len(rob.rows) == 1
    row, recorded = rob.rows[0], protocol_run["robustness"]
    for split, acc in recorded["accuracy"].items():
        assert row[f"acc:{split}"] == acc
    assert (row["mean"], row["gap"]) == (recorded["mean"], recorded["gap"])
    zs = tables["zeroshot"]
    keys = [c.key for c in zs.columns]
    assert {"top5_after", "recall_after"} <= set(keys)
    shape = next(r for r in zs.rows if r["task"] == "shapes-zs-shape")
    z = protocol_run["zeroshot"]["shapes-zs-shape"]
    assert (shape["top5_after"], shape["recall_after"]) == (z["top5"]["after"],
                                                            z["mean_recall"]["after"])



def test_interpolation_rebuilds_the_budget_split_and_the_task_prompts(protocol_run):
    from attndrift.interpolate import interpolate_run

    result = interpolate_run(protocol_run["_dir"], [0.0, 1.0])
    first, last = result["rows"]
    z = protocol_run["zeroshot"]["shapes-zs-shape"]  # 96 images, paper21's prompt
    assert first["zeroshot"]["shapes-zs-shape"] == pytest.approx(z["before"], abs=1e-9)
    assert last["zeroshot"]["shapes-zs-shape"] == pytest.approx(z["after"], abs=1e-9)
    assert last["val_acc"] == pytest.approx(protocol_run["final"]["val_acc"], abs=1e-9)


def test_measuring_a_budget_run_rebuilds_its_probe_split(protocol_run, tmp_path):
    from attndrift.measure import measure

    got = measure(str(protocol_run["_dir"]), tmp_path / "m", reference="tiny")
    data = protocol_run["provenance"]["data"]
    assert got["provenance"]["data"]["probe_ids"] == data["probe_ids"]
    assert got["provenance"]["data"]["val_ids"] == data["val_ids"]
    for task, z in protocol_run["zeroshot"].items():  # shapes-zs-shape: its 96-image view
        assert got["zeroshot"][task]["after"] == pytest.approx(z["after"], abs=1e-12), task
    for m, value in protocol_run["final"]["delta_pct"].items():
        assert got["final"]["delta_pct"][m] == pytest.approx(value, abs=1e-9), m
