"""The study's methods as published: fp16 AMP, the ragged last batch, the study presets."""

from pathlib import Path

import pytest
import torch

from attndrift.config import ConfigError, load_config
from attndrift.study.spec import load_study
from attndrift.train import run
from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["probe.per_epoch=1", "probe.subsets=1", "probe.images=16", "save_checkpoints=false",
         "data.zeroshot=[shapes-zs-shape]", "probe.aux=[]"]


def test_fp16_is_a_config_error_on_the_cpu():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.precision=fp16", "device=cpu"])
    assert "\n" not in str(err.value) and "CUDA" in str(err.value)
    assert load_config(None, ["train.precision=fp16"]).train.precision == "fp16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp16_run_fails_before_training_without_cuda(tmp_path):
    with pytest.raises(ValueError, match=r"fp16.*needs a CUDA device"):
        run(tiny_config("tiny_full_ft", *SHORT, "train.precision=fp16"), tmp_path,
            progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_run_trains_with_a_grad_scaler(tmp_path):
    rec = run(tiny_config("tiny_full_ft", *SHORT, "train.precision=fp16", "device=cuda"),
              tmp_path, progress=False)
    assert rec["status"] == "completed"
    losses = [e["loss"] for e in rec["history"]["loss"]]
    assert losses[-1] < losses[0]


def test_the_ragged_last_batch_is_kept_by_default(tmp_path):
    # 100 training images in batches of 32: 4 steps an epoch (32, 32, 32, 4), as the study's
    # loaders did; drop_last=true gives 3
    common = [*SHORT, "data.train_limit=100", "train.batch_size=32", "train.epochs=2"]
    kept = run(tiny_config("tiny_full_ft", *common), tmp_path / "kept", progress=False)
    assert kept["final"]["step"] == 8 and [e["step"] for e in kept["history"]["epochs"]] == [4, 8]
    dropped = run(tiny_config("tiny_full_ft", *common, "train.drop_last=true"),
                  tmp_path / "dropped", progress=False)
    assert dropped["final"]["step"] == 6
    assert [e["step"] for e in dropped["history"]["epochs"]] == [3, 6]


def test_study_presets_train_as_the_study_did():
    for name in ("paper21", "matched_lr80", "backbone", "followup"):
        path = ROOT / "configs" / "studies" / f"{name}.yaml"
        assert "fp16" in path.read_text().split("\nname:")[0], f"{name}: header says fp16"
        _, planned = load_study(path)
        for p in planned:
            assert p.config.train.precision == "fp16", p.run_id
            assert p.config.train.drop_last is False
    assert load_config(ROOT / "configs" / "runs" / "tiny_full_ft.yaml").train.precision == "auto"


def test_paper21_lora_alpha_is_twice_the_rank():
    _, planned = load_study(ROOT / "configs" / "studies" / "paper21.yaml")
    lora = [p.config for p in planned if p.config.method == "lora"]
    assert {c.lora.r for c in lora} == {4, 8, 16}
    assert all(c.lora.alpha == 2 * c.lora.r for c in lora)  # scale alpha / r = 2 at every rank


def test_study_plan_prints_every_run_with_its_distinguishing_keys():
    import json

    from typer.testing import CliRunner

    from attndrift.cli import app
    from attndrift.study.spec import distinguishing

    path = ROOT / "configs" / "studies" / "followup.yaml"
    _, planned = load_study(path)
    assert len(planned) == 18  # 2 datasets x 2 methods x 3 seeds + APR and floor x 3 seeds
    keys, values = distinguishing(planned)
    assert keys == ["seed", "method", "train.epochs", "train.lr", "data.dataset",
                    "regularizer.name", "regularizer.lam"]
    assert len({json.dumps(v, sort_keys=True) for v in values}) == 18  # every run told apart
    result = CliRunner().invoke(app, ["study", "plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert [r["run_id"] for r in shown["runs"]] == [p.run_id for p in planned]
    assert shown["runs"][3]["values"]["method"] == "lora"
    assert shown["runs"][3]["values"]["train.lr"] == pytest.approx(1e-4)
    table = CliRunner().invoke(app, ["study", "plan", str(path)], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "regularizer.name" in table.output


def test_cifar10_and_flowers102_are_zero_shot_tasks(tmp_path, monkeypatch):
    # Written to disk under their hub ids in a data mirror: the registry path of the real ids.
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from attndrift.data.names import FLOWERS102
    from attndrift.data.registry import load_task

    monkeypatch.setenv("ATTNDRIFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ATTNDRIFT_DATA_ROOT", str(tmp_path / "mirror"))
    colour = load_task("shapes-zs-colour", "test")
    images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in colour.images[:60]]
    labels = colour.labels[:60].tolist()
    cifar = datasets.Features({"img": datasets.Image(),
                               "label": datasets.ClassLabel(names=colour.class_names)})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"img": images, "label": labels}, features=cifar)}).save_to_disk(
        str(tmp_path / "mirror" / "uoft-cs" / "cifar10"))
    numbered = [str(i) for i in range(1, 103)]  # some copies number the flowers
    flowers = datasets.Features({"image": datasets.Image(),
                                 "label": datasets.ClassLabel(names=numbered)})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"image": images, "label": labels}, features=flowers)}).save_to_disk(
        str(tmp_path / "mirror" / "nelorth" / "oxford-flowers"))
    assert load_task("flowers102", "test").class_names == list(FLOWERS102)
    rec = run(tiny_config("tiny_full_ft", *SHORT, "train.max_steps=2",
                          "data.zeroshot=[cifar10, flowers102]"), tmp_path / "run",
              progress=False)
    assert set(rec["zeroshot"]) == {"cifar10", "flowers102"}
    assert rec["zeroshot"]["flowers102"]["classes"] == 102
    # the tiny CLIP knows colour words: CIFAR-10's slot, holding colour images and names, is
    # well above chance before fine-tuning
    assert rec["zeroshot"]["cifar10"]["before"] > 0.5
    assert rec["sanity"]["cifar10"]["ok"]
