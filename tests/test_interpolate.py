"""Tests for attndrift.interpolate on real short runs of the shipped tiny CLIP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from attndrift.cli import app
from attndrift.config import load_config
from attndrift.interpolate import INTERPOLATION_FILE, _Interpolator, interpolate_run
from attndrift.models.clip import load_clip
from attndrift.models.restore import restore_run
from attndrift.records import read_record
from attndrift.zeroshot import clip_image_encoder

ROOT = Path(__file__).resolve().parents[1]
TASK = "shapes-zs-shape"
FAST = ["train.epochs=1", "data.train_limit=128", "train.batch_size=32", "probe.per_epoch=1",
        "probe.images=16", f"data.zeroshot=[{TASK}]"]

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _run(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    from attndrift.train import run

    out = tmp_path_factory.mktemp(name)
    record = run(load_config(ROOT / "configs" / "runs" / f"{name}.yaml", FAST), out,
                 progress=False)
    assert record["status"] == "completed"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: _run(tmp_path_factory, name) for name in ("tiny_full_ft", "tiny_lora")}


@pytest.fixture(scope="module")
def results(runs: dict[str, Path]) -> dict[str, dict]:
    # alpha 0.5 only for LoRA: WiSE-FT's midpoint is checked on the weights below
    return {"tiny_full_ft": interpolate_run(runs["tiny_full_ft"], [0.0, 1.0]),
            "tiny_lora": interpolate_run(runs["tiny_lora"], [0.0, 0.5, 1.0])}


@pytest.mark.parametrize("name", ["tiny_full_ft", "tiny_lora"])
def test_ends_reproduce_pretrained_and_adapted(name: str, runs: dict, results: dict) -> None:
    record = read_record(runs[name])
    result = results[name]
    first, last = result["rows"][0], result["rows"][-1]
    assert [r["alpha"] for r in result["rows"]] == result["alphas"]
    assert result["alphas"][0] == 0.0 and result["alphas"][-1] == 1.0
    zs = record["zeroshot"][TASK]
    assert first["zeroshot"][TASK] == pytest.approx(zs["before"], abs=1e-9)
    assert last["zeroshot"][TASK] == pytest.approx(zs["after"], abs=1e-9)
    for key in ("entropy", "erf", "gini", "head_diversity"):
        assert first["metrics"]["mean"][key] == pytest.approx(record["baseline"]["mean"][key],
                                                              abs=1e-6)
        assert last["metrics"]["mean"][key] == pytest.approx(
            record["final"]["metrics"]["mean"][key], abs=1e-6)
    assert first["delta_pct"]["entropy"] == pytest.approx(0.0, abs=1e-4)
    assert last["test_acc"] == pytest.approx(record["final"]["test_acc"], abs=1e-9)
    assert last["val_acc"] == pytest.approx(record["final"]["val_acc"], abs=1e-9)
    # not vacuous: the run moved the encoder's attention
    h = [r["metrics"]["mean"]["entropy"] for r in result["rows"]]
    assert abs(h[-1] - h[0]) > 1e-4
    if len(h) == 3:  # alpha 0.5 lies in between
        assert min(h[0], h[2]) - 1e-3 < h[1] < max(h[0], h[2]) + 1e-3
    assert result["scheme"] == ("lora-scale" if name == "tiny_lora" else "wise-ft")
    saved = json.loads((runs[name] / INTERPOLATION_FILE).read_text())
    assert saved["alphas"] == result["alphas"] and len(saved["rows"]) == len(h)


def test_full_ft_weights_are_exact_wise_ft(runs: dict) -> None:
    loaded, adapted = restore_run(runs["tiny_full_ft"])
    model = adapted.model
    pre = load_clip("tiny").model
    x = loaded.preprocessor()(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        tuned_emb = model.embed(x)
        pre_emb = clip_image_encoder(pre)(x)
    walker = _Interpolator(model, dict(pre.named_parameters()))
    assert "visual_projection.weight" in walker.finetuned and "head.weight" not in \
        walker.finetuned
    head = model.head.weight.detach().clone()
    walker.set(0.0)
    with torch.no_grad():
        assert torch.equal(model.embed(x), pre_emb)
    q = "vision_model.encoder.layers.1.self_attn.q_proj.weight"
    walker.set(0.5)
    mid = dict(model.named_parameters())[q]
    torch.testing.assert_close(mid, 0.5 * dict(pre.named_parameters())[q] + 0.5 *
                               walker.finetuned[q])
    walker.restore()
    with torch.no_grad():
        assert torch.equal(model.embed(x), tuned_emb)
    assert torch.equal(model.head.weight, head)  # the head is never interpolated


def test_lora_scaling_equals_merged_math(runs: dict) -> None:
    _, adapted = restore_run(runs["tiny_lora"])
    model = adapted.model
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "set_scale")]
    assert layers
    deltas = [m.get_delta_weight("default").detach().clone() for m in layers]
    assert max(float(d.abs().max()) for d in deltas) > 0  # training moved the adapters
    pre = load_clip("tiny").model
    walker = _Interpolator(model, dict(pre.named_parameters()))
    assert not any("lora_" in n for n in walker.finetuned)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    for alpha in (0.0, 0.3, 1.0):
        walker.set(alpha)
        with torch.no_grad():
            for module, delta in zip(layers, deltas, strict=True):
                base = module.base_layer
                expected = F.linear(x, base.weight + alpha * delta, base.bias)
                torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)
    walker.restore()
    assert all(m.scaling["default"] == m.lora_alpha["default"] / m.r["default"] for m in layers)


runner = CliRunner()


def test_cli(runs: dict, tmp_path: Path) -> None:
    # on a copy: the walk it writes would replace the run's own, which later tests read
    lora = tmp_path / "lora"
    shutil.copytree(runs["tiny_lora"], lora)
    ok = runner.invoke(app, ["interpolate", str(lora), "--alphas", "1"])
    assert ok.exit_code == 0, ok.output
    assert "alpha" in ok.output and "interpolation.json" in ok.output
    for alphas in ("0,1.5", "-0.1", "a,b", ""):
        bad = runner.invoke(app, ["interpolate", str(lora), "--alphas", alphas])
        lines = [line for line in bad.output.strip().splitlines() if line.strip()]
        assert bad.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:")
    missing = runner.invoke(app, ["interpolate", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no record" in missing.output
    failed = tmp_path / "failed"
    shutil.copytree(runs["tiny_lora"], failed)
    record = json.loads((failed / "record.json").read_text())
    record["status"] = "failed"
    (failed / "record.json").write_text(json.dumps(record))
    result = runner.invoke(app, ["interpolate", str(failed), "--alphas", "0"])
    assert result.exit_code == 1 and "run is failed" in result.output


def test_walks_reach_the_report_table_and_figure(runs: dict, results: dict, tmp_path) -> None:
    """Issue 22 item 5: interpolation.json is read into a table and a figure, its ends the
    pretrained model's and the run's own numbers."""
    from matplotlib.figure import Figure

    from attndrift.analysis import load_store
    from attndrift.analysis.interpolation import interpolation
    from attndrift.report.interpolation import interpolation as draw

    store = tmp_path / "store"
    for name, path in runs.items():
        shutil.copytree(path, store / name)
    loaded = load_store(store)
    table = interpolation(loaded)
    by = {(r["setting"], r["alpha"]): r for r in table.rows}
    assert len(table.rows) == 5  # full FT at 0 and 1, LoRA at 0, 0.5, 1
    for name, path in runs.items():
        record = read_record(path)
        label = next(r["setting"] for r in table.rows if r["members"] == (str(store / name),))
        zs = record["zeroshot"][TASK]
        assert by[label, 1.0]["zs_mean"] == pytest.approx(zs["after"], abs=1e-9)
        assert by[label, 0.0]["zs_mean"] == pytest.approx(zs["before"], abs=1e-9)
        assert by[label, 1.0]["test_acc"] == pytest.approx(record["final"]["test_acc"], abs=1e-9)
        assert by[label, 1.0]["n"] == 1
    fig = draw(loaded)
    assert isinstance(fig, Figure)
    ends = [ln for ax in fig.axes for ln in ax.lines if ln.get_marker() in ("o", "s")]
    assert len(ends) == 4  # a pretrained and a fine-tuned end per walked run
