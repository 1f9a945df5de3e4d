"""Every number right on a real-shaped multi-backbone store (issue 12): settings are grouped as
the store was designed (`tests/realshaped.py` is the ground truth), labels say what
distinguishes them, and no table row or statistic mixes settings. Means and sds are recomputed
here in float64 straight from the record files, not through attndrift.analysis."""

import json
from pathlib import Path

import pytest

import realshaped as rs
from attndrift.analysis import load_store
from attndrift.analysis.runs import (
    LR_KEYS,
    METHOD_KEYS,
    group_families,
    group_settings,
    model_of,
    setting_key,
    short_model,
    short_number,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("realshaped")
    return root, rs.write_store(root)


@pytest.fixture(scope="module")
def runs(store):
    return load_store(store[0])


@pytest.fixture(scope="module")
def records(store) -> dict[str, dict]:
    """run directory name -> the record as JSON (read without attndrift)."""
    root, truth = store
    return {d: json.loads((root / d / "record.json").read_text()) for d in truth}


def test_settings_are_the_designed_ones(store, runs):
    _, truth = store
    settings = group_settings(runs)
    assert len(settings) == len(rs.SPECS)
    for s in settings:
        specs = {truth[r.path.name] for r in s.runs}
        assert len(specs) == 1, f"{s.label} mixes {specs}"
        spec = rs.SPECS[specs.pop()]
        seeds = list(spec.seeds) + ([rs.FAILED_IN[1]] if spec.name == rs.FAILED_IN[0] else [])
        assert s.seeds == sorted(seeds)  # numeric order: 7, 11, 19, not "11, 19, 7"
        assert len(s.completed) == len(spec.seeds)


def test_operational_keys_do_not_split_a_setting(runs):
    """Seed 7 checkpoints every 5 minutes, the others every 10: still one setting."""
    by_name: dict[str, set] = {}
    for r in runs:
        by_name.setdefault(r.config["name"], set()).add(setting_key(r.config))
    assert all(len(keys) == 1 for keys in by_name.values())
    cfg = runs[0].config
    for key, value in (("device", "cpu"), ("name", "x"), ("seed", 99)):
        assert setting_key({**cfg, key: value}) == setting_key(cfg)
    for section, key, value in (
        ("train", "compile", "inductor"),
        ("train", "log_every", 1),
        ("probe", "batch_size", 7),
        ("probe", "precision", "bf16"),
        ("data", "eval_batch_size", 3),
        ("data", "zeroshot", []),
    ):
        assert setting_key({**cfg, section: {**cfg[section], key: value}}) == setting_key(cfg)
    for section, key, value in (
        ("train", "weight_decay", 0.5),
        ("train", "precision", "bf16"),
        ("probe", "images", 50),
        ("train", "epochs", 9),
    ):
        assert setting_key({**cfg, section: {**cfg[section], key: value}}) != setting_key(cfg)


def test_inert_keys_do_not_split_a_setting(runs):
    ft = next(r.config for r in runs if r.config["method"] == "full_ft")
    assert setting_key({**ft, "lora": {**ft["lora"], "r": 64}}) == setting_key(ft)
    lora = next(r.config for r in runs if r.config["method"] == "lora")
    assert setting_key({**lora, "lora": {**lora["lora"], "r": 64}}) != setting_key(lora)
    assert setting_key({**ft, "regularizer": {**ft["regularizer"], "ratio": 0.5}}) == (
        setting_key(ft)
    )


def test_labels_name_what_distinguishes_settings(store, runs):
    _, truth = store
    settings = group_settings(runs)
    labels = [s.label for s in settings]
    assert len(set(labels)) == len(labels)
    by_spec = {truth[s.runs[0].path.name]: s.label for s in settings}
    assert by_spec["b16_eurosat_lora8_0.0001"] == "ViT-B/16 · eurosat · LoRA r=8 α=16 · lr 1e-4"
    assert by_spec["b32_pets_lora4_1e-04"] == "ViT-B/32 · pets · LoRA r=4 α=8 · lr 1e-4"
    assert by_spec["b32_pets_ft_wd0.1_1e-05"] == "ViT-B/32 · pets · full FT · wd 0.1 · lr 1e-5"
    assert by_spec["b32_eurosat_ft_apr0.1_1e-04"] == (
        "ViT-B/32 · eurosat · full FT · APR λ=0.1 · lr 1e-4"
    )
    # among the settings of one backbone and dataset, only what varies there is named
    sub = [r for r in runs if truth[r.path.name].startswith("b32_pets_")]
    assert {s.label for s in group_settings(sub)} >= {
        "full FT · lr 1e-5",
        "full FT · wd 0.1 · lr 1e-5",
        "LoRA r=16 α=32 · lr 1e-4",
    }
    one = [r for r in runs if truth[r.path.name] == "b32_pets_ft_1e-05"]
    assert [s.label for s in group_settings(one)] == ["ViT-B/32 · pets · full FT"]


def test_order_is_numeric_and_case_insensitive(runs):
    labels = [s.label for s in group_settings(runs)]
    b16_eurosat = [x for x in labels if x.startswith("ViT-B/16 · eurosat")]
    assert b16_eurosat == [
        "ViT-B/16 · eurosat · full FT · lr 1e-5",
        "ViT-B/16 · eurosat · full FT · lr 3e-5",
        "ViT-B/16 · eurosat · full FT · lr 1e-4",
        "ViT-B/16 · eurosat · full FT · wd 0.1 · lr 1e-5",
        "ViT-B/16 · eurosat · LoRA r=4 α=8 · lr 1e-4",
        "ViT-B/16 · eurosat · LoRA r=8 α=16 · lr 1e-4",
        "ViT-B/16 · eurosat · LoRA r=8 α=16 · lr 1e-3",
        "ViT-B/16 · eurosat · LoRA r=16 α=32 · lr 1e-4",
    ]


def test_families_except_lr_and_except_lr_and_method(store, runs):
    _, truth = store
    fams = group_families(runs)
    sweep = next(f for f in fams if f.label == "ViT-B/32 · eurosat · full FT")
    assert [truth[s.runs[0].path.name] for s in sweep.settings] == [
        "b32_eurosat_ft_1e-05",
        "b32_eurosat_ft_3e-05",
        "b32_eurosat_ft_0.0001",
    ]
    for f in fams:  # a family never spans two backbones, datasets or methods
        assert (
            len(
                {
                    (model_of(s.config), s.config["data"]["dataset"], s.config["method"])
                    for s in f.settings
                }
            )
            == 1
        )
    wide = group_families(runs, LR_KEYS + METHOD_KEYS)
    b32e = next(f for f in wide if f.label == "ViT-B/32 · eurosat")
    assert len(b32e.settings) == 7  # 3 full FT lrs + 4 LoRA settings; wd and APR apart


def test_short_names():
    assert short_model("openai/clip-vit-base-patch32") == "ViT-B/32"
    assert short_model("openai/clip-vit-large-patch14-336") == "ViT-L/14@336"
    assert short_model("tiny") == "tiny"
    assert [short_number(x) for x in (1e-4, 3e-5, 1e-3, 0.01, 16.0)] == [
        "1e-4",
        "3e-5",
        "1e-3",
        "0.01",
        "16",
    ]
