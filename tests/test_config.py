"""Config validation: unknown keys, wrong types, NaN and strings-for-numbers are one-line errors."""

from pathlib import Path

import pytest

from attndrift.config import ConfigError, RunConfig, load_config, parse_yaml, validate

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_study_defaults():
    cfg = RunConfig()
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16 and cfg.lora.dropout == 0.05
    assert cfg.train.warmup_frac == 0.05 and cfg.train.grad_clip == 1.0
    assert cfg.train.weight_decay == 0.01 and cfg.probe.per_epoch == 5 and cfg.probe.images == 200


def test_yaml_reads_exponent_floats_as_numbers():
    # PyYAML alone reads "1e-4" as a string; attndrift's loader must not.
    data = parse_yaml("train:\n  lr: 1e-4\n  weight_decay: 5E-2\n")
    assert data == {"train": {"lr": 1e-4, "weight_decay": 5e-2}}
    assert validate(data).train.lr == pytest.approx(1e-4)


def test_overrides_apply_dotted_keys():
    cfg = load_config(None, ["train.lr=3e-5", "method=lora", "lora.r=4",
                             "data.zeroshot=[eurosat, pets]"])
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.method == "lora" and cfg.lora.r == 4 and cfg.data.zeroshot == ["eurosat", "pets"]


@pytest.mark.parametrize(("override", "field", "needle"), [
    ("trian.lr=1", "trian", "unknown key"),
    ("train.lrr=1", "train.lrr", "unknown key"),
    ("train.lr=fast", "train.lr", "valid number"),
    ("train.lr='1e-4'", "train.lr", "valid number"),
    ("train.lr=.nan", "train.lr", "finite"),
    ("train.lr=.inf", "train.lr", "finite"),
    ("train.epochs=2.5", "train.epochs", "integer"),
    ("train.batch_size=0", "train.batch_size", "greater than 0"),
    ("method=adapter", "method", "full_ft"),
    ("lora.targets=[fc1]", "lora.targets", "q_proj"),
])
def test_bad_values_name_the_field(override, field, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message
    assert field in message and needle in message


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="freeze_layers"):
        load_config(None, ["method=freeze"])
    with pytest.raises(ConfigError, match="only applies to method=freeze"):
        load_config(None, ["freeze_layers=2"])
    assert load_config(None, ["method=freeze", "freeze_layers=2"]).freeze_layers == 2


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "runs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_validate_and_document_themselves(path):
    load_config(path)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "Command:" in text and "Runtime:" in text and "Expected" in text
    assert f"attndrift run configs/runs/{path.name}" in text


def test_docs_config_reference_matches_the_code():
    from attndrift.config import REFERENCE_HEADER, reference_markdown

    expected = REFERENCE_HEADER + reference_markdown()
    assert (ROOT / "docs" / "config.md").read_text() == expected, \
        "docs/config.md is stale: run attndrift config-reference > docs/config.md"


def test_operational_settings_are_not_part_of_the_run_identity():
    from attndrift.config import OPERATIONAL_KEYS, RunConfig, identity
    from attndrift.records import run_id_for
    from attndrift.study.spec import config_hash

    base = RunConfig()
    changed = RunConfig(tensorboard=True, save_checkpoints=False,
                        train={"checkpoint_every": 7, "checkpoint_minutes": 0.5})
    other_lr = RunConfig(train={"lr": 3e-4})
    dump = base.model_dump(mode="json")
    assert identity(dump) != dump and dump == RunConfig().model_dump(mode="json")  # not mutated
    for *parents, key in OPERATIONAL_KEYS:
        section = identity(dump)
        for part in parents:
            section = section[part]
        assert key not in section
    assert config_hash(changed) == config_hash(base) != config_hash(other_lr)
    ids = {run_id_for(identity(c.model_dump(mode="json"))) for c in (base, changed)}
    assert len(ids) == 1


def test_compile_with_attention_hook_regularizers_is_refused():
    with pytest.raises(ConfigError, match=r"train\.compile=null"):
        validate({"train": {"compile": "inductor"},
                  "regularizer": {"name": "apr", "lam": 0.1}})
    assert validate({"train": {"compile": "inductor"},
                     "regularizer": {"name": "l2sp", "lam": 0.1}}).train.compile == "inductor"
