"""`attndrift measure` on the checkpoints people actually have, and on hostile ones.

Every odd checkpoint is built here from the shipped tiny CLIP with the real libraries
(transformers ``save_pretrained``, PEFT ``get_peft_model``/``save_pretrained``): a
``CLIPForImageClassification`` save (no text tower), the PEFT classification adapter
(``modules_to_save=["classifier"]``), adapters with missing tensors, and files that are
truncated, empty, oversized, pickled or not checkpoints at all. Nothing is ever scored on
randomly initialised weights: each is completed from the reference (and the record says so)
or refused in one line with exit status 2. Measurements never overwrite what they did not
write.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from attndrift.cli import app
from attndrift.config import ConfigError
from attndrift.measure import OutDirTaken, existing_measurement, measure, plan_measurement
from attndrift.models.clip import TINY_CLIP_DIR, load_clip
from attndrift.models.errors import ArchitectureMismatch, ExternalModelError
from attndrift.records import read_record

TASK = "shapes-zs-shape"
SMALL = ["probe.images=16", "probe.subsets=2"]
ARGS = {"reference": "tiny", "dataset": "shapes-layout", "zeroshot": [TASK], "overrides": SMALL}

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


def _cli(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def _image_classifier(num_labels: int = 3):
    from transformers import CLIPForImageClassification

    return CLIPForImageClassification.from_pretrained(str(TINY_CLIP_DIR), num_labels=num_labels)


def _lora(model, seed: int, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # as if trained: B starts at zero
                p.normal_(0.0, 0.3)
    return peft_model


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> Path:
    """The tiny CLIP measured against itself."""
    root = tmp_path_factory.mktemp("measured")
    record = measure(str(TINY_CLIP_DIR), root / "ref", **ARGS)
    assert record["status"] == "completed"
    return root / "ref"


# --- 22.1: a CLIPForImageClassification save has no text tower -----------------------------


def test_image_classification_save_takes_missing_parts_from_reference(tmp_path: Path) -> None:
    _image_classifier().save_pretrained(tmp_path / "cls")  # untouched: the reference's encoder
    code, lines = _cli("measure", str(tmp_path / "cls"), "--reference", "tiny", "--data",
                       "shapes-layout", "--zeroshot", TASK, *SMALL, "--out", str(tmp_path / "m"))
    assert code == 0 and any(line.startswith("note: not in the checkpoint, taken from the "
                                             "reference: visual projection, text tower")
                             for line in lines), lines
    got = read_record(tmp_path / "m")
    zs = got["zeroshot"][TASK]
    assert zs["retention_pct"] == pytest.approx(100.0) and zs["after"] == zs["before"]
    assert all(v == 0.0 for v in got["final"]["delta_pct"].values())
    fin = got["provenance"]["finetuned"]
    assert fin["text_tower"] == "reference"
    assert {"text tower", "text projection", "visual projection", "logit scale"} == set(
        fin["from_reference"]
    )
    assert "3-class head" in fin["head"] and "not scored" in fin["head"]
    assert got["final"]["test_acc"] is None
    # a vision tensor missing from the checkpoint is refused, never filled
    state = load_file(tmp_path / "cls" / "model.safetensors")
    del state["vision_model.encoder.layers.1.mlp.fc1.weight"]
    save_file(state, tmp_path / "cls" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArchitectureMismatch, match="lacks 1 vision-tower tensors"):
        measure(str(tmp_path / "cls"), tmp_path / "m2", **ARGS)
    # as a reference (or run model=DIR) it is not a whole CLIP
    _image_classifier().save_pretrained(tmp_path / "cls2")
    with pytest.raises(ValueError, match="no text_model tensors"):
        load_clip(str(tmp_path / "cls2"))


# --- 22.2, 24.2: PEFT adapters, checked both ways --------------------------------------------


def test_peft_classification_adapter_is_measured(tmp_path: Path) -> None:
    from test_measure import _eager_entropy, _probe_images

    peft_model = _lora(_image_classifier(), 1, target_modules=["q_proj", "v_proj"],
                       modules_to_save=["classifier"])
    peft_model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/other-clip"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    merged = peft_model.merge_and_unload()
    got = measure(str(tmp_path / "a"), tmp_path / "m", **ARGS)
    fin = got["provenance"]["finetuned"]
    assert "modules_to_save ['classifier']" in fin["head"] and "not scored" in fin["head"]
    assert fin["adapted_towers"] == "vision" and fin["text_tower"] == "reference"
    assert any("someone/other-clip" in w for w in got["warnings"])
    # the adapter landed where it was trained: the merged encoder's attention, computed apart
    reference = load_clip("tiny")
    clip = reference.model
    clip.load_state_dict({k: v for k, v in merged.state_dict().items()
                          if k.startswith("vision_model.")}, strict=False)
    x = reference.preprocessor()(_probe_images())
    assert got["final"]["metrics"]["mean"]["entropy"] == pytest.approx(
        _eager_entropy(clip, x), abs=1e-5)
    assert abs(got["final"]["delta_pct"]["entropy"]) > 0.01


@pytest.mark.parametrize("case", ["empty", "only_lora_A", "random_init_only_A"])
def test_adapter_with_missing_tensors_is_refused(case: str, tmp_path: Path) -> None:
    init = {"init_lora_weights": False} if case.startswith("random") else {}
    _lora(load_clip("tiny").model, 2, target_modules=["q_proj", "v_proj"], **init
          ).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    kept = {} if case == "empty" else {k: v for k, v in state.items() if "lora_A" in k}
    save_file(kept, weights)
    what = "holds no tensors" if case == "empty" else f"lacks {len(state) - len(kept)} of"
    with pytest.raises(ExternalModelError, match=what):
        measure(str(tmp_path / "a"), tmp_path / "m", **ARGS)
    assert not (tmp_path / "m" / "record.json").exists()


# --- 22.3, 24.1: never overwrite, same input -> already measured ------------------------------


def test_measure_never_replaces_what_it_did_not_write(
    full_ft_run: Path, lora_run: Path, measured: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (lora_run / "record.json").read_bytes()
    for out in (lora_run, full_ft_run):  # another run, and the run itself
        with pytest.raises(OutDirTaken, match="training run"):
            measure(str(full_ft_run), out)
    assert (lora_run / "record.json").read_bytes() == before
    # the same measurement again: the record as it is, nothing rewritten
    record_bytes, mtime = (measured / "record.json").read_bytes(), (
        measured / "record.json").stat().st_mtime_ns
    again = measure(str(TINY_CLIP_DIR), measured, **ARGS)
    assert again == read_record(measured)
    assert (measured / "record.json").stat().st_mtime_ns == mtime
    assert (measured / "record.json").read_bytes() == record_bytes
    code, lines = _cli("measure", str(TINY_CLIP_DIR), "--reference", "tiny", "--data",
                       "shapes-layout", "--zeroshot", TASK, "--set", SMALL[0], "--set", SMALL[1],
                       "--out", str(measured))
    assert code == 0 and lines[0].startswith("already measured"), lines
    # another measurement into it: refused, unless --force
    other = plan_measurement(str(TINY_CLIP_DIR), measured, name="other", **ARGS)
    with pytest.raises(OutDirTaken, match="another measurement"):
        existing_measurement(other)
    assert existing_measurement(other, force=True) is None
    # files a measurement did not write
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(OutDirTaken, match="did not write"):
        measure(str(TINY_CLIP_DIR), tmp_path / "busy", **ARGS)
    # the default OUT is derived from the input: two measurements do not collide
    monkeypatch.chdir(tmp_path)
    a = plan_measurement(str(TINY_CLIP_DIR), **ARGS)
    b = plan_measurement(str(TINY_CLIP_DIR), **{**ARGS, "overrides": ["probe.images=8"]})
    assert a.out_dir == Path("runs/measured") / a.run_id and a.out_dir != b.out_dir
    assert a.run_id == read_record(measured)["run_id"]  # the device is not part of it


def test_one_process_measures_into_a_directory_at_a_time(tmp_path: Path) -> None:
    from filelock import FileLock

    from attndrift.measure import run_measurement

    plan = plan_measurement(str(TINY_CLIP_DIR), tmp_path / "m", **ARGS)
    (tmp_path / "m").mkdir()
    # the lock held elsewhere (another process, as the OS sees it)
    with FileLock(tmp_path / "m" / ".lock"), pytest.raises(OutDirTaken, match="another proc"):
        run_measurement(plan)
    assert not (tmp_path / "m" / "record.json").exists()


def test_zeroshot_is_required_beyond_the_tiny_clip(tmp_path: Path) -> None:
    load_clip("tiny").model.save_pretrained(tmp_path / "ref")  # not the shipped tiny by name
    args = {**ARGS, "reference": str(tmp_path / "ref"), "zeroshot": None}
    with pytest.raises(ConfigError, match="give --zeroshot"):
        plan_measurement(str(TINY_CLIP_DIR), tmp_path / "m", **args)
    assert plan_measurement(str(TINY_CLIP_DIR), **{**ARGS, "zeroshot": None}).data.zeroshot == [
        TASK]


# --- 24.10, 22.9: one line, exit 2 -------------------------------------------------------------


def _hostile_files(root: Path) -> dict[str, list[str]]:
    """Name -> measure arguments of a hostile input."""
    real = (TINY_CLIP_DIR / "model.safetensors").read_bytes()
    (root / "zero.safetensors").write_bytes(b"")
    (root / "trunc.safetensors").write_bytes(real[: len(real) // 2])
    (root / "huge.safetensors").write_bytes(struct.pack("<Q", 2**63) + b"{}")
    header = json.dumps({"x": {"dtype": "F32", "shape": [2**61], "data_offsets": [0, 2**63]}})
    (root / "huge_tensor.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header.encode() + bytes(8))
    cases = {n: [str(root / f"{n}.safetensors")] for n in ("zero", "trunc", "huge", "huge_tensor")}
    _lora(load_clip("tiny").model, 3, target_modules=["q_proj"]).save_pretrained(root / "a")
    for name, edit in (("link", None), ("list_config", "[]"),
                       ("deep_config", "[" * 100000 + "]" * 100000),
                       ("ia3", '{"peft_type": "IA3", "target_modules": ["q_proj"]}')):
        shutil.copytree(root / "a", root / name)
        if edit is None:
            (root / name / "adapter_model.safetensors").unlink()
            (root / name / "adapter_model.safetensors").symlink_to(root / name / "README.md")
        else:
            (root / name / "adapter_config.json").write_text(edit)
        cases[name] = [str(root / name)]
    shutil.copytree(TINY_CLIP_DIR, root / "pickled")
    (root / "pickled" / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2), "m": torch.nn.Linear(2, 2)},
               root / "pickled" / "pytorch_model.bin")
    cases["pickled"] = [str(root / "pickled")]
    cases["dora_format"] = [str(root / "a"), "--format", "dora"]
    return cases


def test_hostile_inputs_are_one_line(tmp_path: Path, full_ft_run: Path, measured: Path) -> None:
    base = ["--reference", "tiny", "--data", "shapes-layout", "--zeroshot", TASK]
    expect = {"zero": "0-byte", "trunc": "not a readable safetensors", "huge": "header too large",
              "huge_tensor": "not a readable safetensors", "link": "README.md",
              "list_config": "a JSON list, not an object", "ia3": "peft_type 'IA3'",
              "deep_config": "nested too deeply",
              "pickled": "pickles more than tensors", "dora_format": "--format peft"}
    for name, args in _hostile_files(tmp_path).items():
        code, lines = _cli("measure", *args, *base, "--out", str(tmp_path / f"o_{name}"))
        assert code == 2 and len(lines) == 1, (name, lines)
        assert expect[name] in lines[0] and "weights_only=False" not in lines[0], (name, lines)
    # run model=DIR: refused when the config is checked, before anything runs
    config = Path(__file__).resolve().parents[1] / "configs" / "runs" / "tiny_full_ft.yaml"
    code, lines = _cli("run", str(config), f"model={tmp_path / 'pickled'}",
                       "--out", str(tmp_path / "r"))
    assert code == 2 and len(lines) == 1 and "pickles more than tensors" in lines[0], lines
    # interpolate: a measured record, and a run whose checkpoint is truncated
    code, lines = _cli("interpolate", str(measured))
    assert code == 2 and len(lines) == 1 and "training run of attndrift" in lines[0], lines
    broken = tmp_path / "broken_run"
    shutil.copytree(full_ft_run, broken)
    data = (broken / "final.safetensors").read_bytes()
    (broken / "final.safetensors").write_bytes(data[: len(data) // 3])
    code, lines = _cli("interpolate", str(broken))
    assert code == 2 and len(lines) == 1 and "not a readable safetensors" in lines[0], lines


def test_a_measurement_name_is_one_directory_name(tmp_path: Path) -> None:
    """--name follows a run config's rule (`pathsafe.check_name`): '../x' is refused in one
    line before anything is loaded, and nothing is written."""
    base = ["--reference", "tiny", "--data", "shapes-layout", "--zeroshot", TASK]
    for bad in ("../x", "a/b", ".hidden"):
        code, lines = _cli("measure", str(TINY_CLIP_DIR), *base, "--name", bad,
                           "--out", str(tmp_path / "m"))
        assert code == 1 and len(lines) == 1 and "one directory name" in lines[0], (bad, lines)
    assert not (tmp_path / "m").exists()
