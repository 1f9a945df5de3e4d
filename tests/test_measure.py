"""`attndrift measure`: checkpoints fine-tuned elsewhere, scored against their reference.

Checked against independent computations: a run's own record (measuring its final weights
must reproduce it), a PEFT adapter merged into plain weights and probed through eager
attention, and an open_clip-format state dict run through an open_clip-style forward written
here in plain torch.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from attndrift.cli import app
from attndrift.data.registry import load_task
from attndrift.data.splits import balanced_subset, stratified_split
from attndrift.measure import measure
from attndrift.models.clip import TINY_CLIP_DIR, load_clip
from attndrift.models.external import ArchitectureMismatch, ExternalModelError
from attndrift.models.open_clip import check_open_clip_name, load_open_clip, open_clip_to_hf
from attndrift.records import read_record
from attndrift.zeroshot import clip_image_encoder, text_classifier, zeroshot_accuracy

ROOT = Path(__file__).resolve().parents[1]
TASK = "shapes-zs-shape"
SMALL = ["probe.images=16", "probe.subsets=2"]  # measured on 16 validation images, 2 subsets

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


def _probe_images(images: int = 16) -> torch.Tensor:
    """The first probe subset of shapes-layout, rebuilt from the split functions directly."""
    source = load_task("shapes-layout", "train", image_size=32)
    _, val_idx = stratified_split(source.labels, 0.2, 42)
    val_labels = source.labels[val_idx]
    return source.images[val_idx][balanced_subset(val_labels, images, 42)]


def _eager_entropy(clip, pixel_values: torch.Tensor) -> float:
    """Layer-mean CLS->patch entropy (nats) from eager attention weights, in float64."""
    clip.vision_model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = clip.vision_model(pixel_values=pixel_values, output_attentions=True)
    finally:
        clip.vision_model.config._attn_implementation = "sdpa"
    values = []
    for attn in out.attentions:  # [B, H, T, T]
        row = attn[:, :, 0, 1:].double()
        p = row / row.sum(-1, keepdim=True)
        values.append(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())
    return float(torch.stack(values).mean())


# --- an attndrift run's own final weights reproduce its record ------------------------------


@pytest.mark.parametrize("which", ["full_ft_run", "lora_run"])
def test_measuring_a_run_reproduces_its_record(which: str, request, tmp_path: Path) -> None:
    run_dir = request.getfixturevalue(which)
    run = read_record(run_dir)
    got = measure(str(run_dir), tmp_path / "m", reference="tiny")
    assert got == read_record(tmp_path / "m")
    assert got["config"]["method"] == "external" and got["status"] == "completed"
    assert got["provenance"]["data"]["probe_ids"] == run["provenance"]["data"]["probe_ids"]
    for m, value in run["final"]["delta_pct"].items():
        assert got["final"]["delta_pct"][m] == pytest.approx(value, abs=1e-9), m
    for m, layers in run["final"]["delta_pct_layers"].items():
        assert got["final"]["delta_pct_layers"][m] == pytest.approx(layers, abs=1e-9), m
    assert got["baseline"]["mean"] == pytest.approx(run["baseline"]["mean"], abs=1e-12)
    for task, z in run["zeroshot"].items():
        assert got["zeroshot"][task]["after"] == pytest.approx(z["after"], abs=1e-12)
        assert got["zeroshot"][task]["before"] == pytest.approx(z["before"], abs=1e-12)
        for key in ("top5", "mean_recall", "prompt"):  # the run's zero-shot entry, all of it
            assert got["zeroshot"][task].get(key) == z.get(key), (task, key)
    assert got["final"]["test_acc"] == pytest.approx(run["final"]["test_acc"], abs=1e-12)
    assert got["final"]["aux"]["weight_drift"] == pytest.approx(
        run["final"]["aux"]["weight_drift"], rel=1e-9
    )
    assert got["final"]["aux"]["cka_cls"] == pytest.approx(run["final"]["aux"]["cka_cls"])
    # not vacuous: the run moved the attention
    assert abs(run["final"]["delta_pct"]["entropy"]) > 0.1
    fin = got["provenance"]["finetuned"]
    assert fin["format"] == "run" and fin["text_tower"] == "reference"
    assert len(fin["sha256"]) == 16 and len(got["provenance"]["reference"]["sha256"]) == 16


def test_reference_against_itself_is_zero_drift(tmp_path: Path) -> None:
    got = measure(
        str(TINY_CLIP_DIR),
        tmp_path / "m",
        reference="tiny",
        dataset="shapes-layout",
        zeroshot=[TASK],
        overrides=SMALL,
    )
    assert got["provenance"]["finetuned"]["format"] == "clip"
    assert all(v == 0.0 for v in got["final"]["delta_pct"].values())
    assert got["zeroshot"][TASK]["retention_pct"] == pytest.approx(100.0)
    assert got["final"]["aux"]["weight_drift"] == 0.0
    assert got["final"]["test_acc"] is None  # no classification head
    assert got["provenance"]["finetuned"]["text_tower"] == "reference"


# --- PEFT adapter directories -----------------------------------------------------------------


def _adapter(tmp_path: Path, targets, seed: int) -> tuple[Path, torch.nn.Module]:
    from peft import LoraConfig, get_peft_model

    clip = load_clip("tiny").model
    torch.manual_seed(seed)
    peft_model = get_peft_model(clip, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # as if trained: B starts at zero
                p.normal_(0.0, 0.3)
    path = tmp_path / f"adapter{seed}"
    peft_model.save_pretrained(path)
    return path, peft_model.merge_and_unload()


def test_peft_adapter_matches_its_merged_weights(tmp_path: Path) -> None:
    path, merged = _adapter(tmp_path, ["q_proj", "v_proj"], seed=1)  # both towers
    got = measure(
        str(path),
        tmp_path / "m",
        reference="tiny",
        dataset="shapes-layout",
        zeroshot=[TASK],
        overrides=SMALL,
    )
    fin = got["provenance"]["finetuned"]
    assert fin["format"] == "peft" and fin["text_tower"] == "fine-tuned"
    assert sorted(fin["target_modules"]) == ["q_proj", "v_proj"]
    loaded = load_clip("tiny")
    pre = loaded.preprocessor()
    x = pre(_probe_images())
    assert got["final"]["metrics"]["mean"]["entropy"] == pytest.approx(
        _eager_entropy(merged, x), abs=1e-5
    )
    assert got["baseline"]["mean"]["entropy"] == pytest.approx(
        _eager_entropy(loaded.model, x), abs=1e-5
    )
    # zero-shot through the merged image encoder and the merged (adapted) text tower
    task = load_task(TASK, "test", image_size=32)
    weights = text_classifier(merged, loaded.tokenizer, task.class_names, task.templates)
    expected = zeroshot_accuracy(clip_image_encoder(merged), weights, task, pre)
    assert got["zeroshot"][TASK]["after"] == pytest.approx(expected, abs=1.5 / len(task))
    assert got["zeroshot"][TASK]["after"] != got["zeroshot"][TASK]["before"]
    assert got["final"]["aux"]["weight_drift"] > 0

    vision_only, _ = _adapter(tmp_path, r".*vision_model.*\.(q_proj|v_proj)", seed=2)
    got = measure(
        str(vision_only),
        tmp_path / "v",
        reference="tiny",
        dataset="shapes-layout",
        zeroshot=[TASK],
        overrides=SMALL,
    )
    assert got["provenance"]["finetuned"]["text_tower"] == "reference"


# --- open_clip state dicts --------------------------------------------------------------------


def _hf_to_open_clip(
    state: dict[str, torch.Tensor], vision_layers: int, text_layers: int
) -> dict[str, torch.Tensor]:
    """open_clip's names for a transformers CLIPModel state dict (written here, independently
    of the library's mapping the other way)."""
    out = {
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
        "visual.proj": state["visual_projection.weight"].t(),
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].t(),
        "logit_scale": state["logit_scale"],
    }
    for tower, prefix, n in (
        ("vision_model", "visual.", vision_layers),
        ("text_model", "", text_layers),
    ):
        for i in range(n):
            hf, oc = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{oc}attn.in_proj_{kind}"] = torch.cat(
                    [state[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"]
                )
                for a, b in (
                    ("ln_1", "layer_norm1"),
                    ("ln_2", "layer_norm2"),
                    ("attn.out_proj", "self_attn.out_proj"),
                    ("mlp.c_fc", "mlp.fc1"),
                    ("mlp.c_proj", "mlp.fc2"),
                ):
                    out[f"{oc}{a}.{kind}"] = state[f"{hf}{b}.{kind}"]
    return {k: v.clone() for k, v in out.items()}


def _resblocks(x, sd, prefix, n, heads, mask=None):
    """open_clip's Transformer: pre-norm residual blocks, nn.MultiheadAttention, QuickGELU."""
    for i in range(n):
        p = f"{prefix}transformer.resblocks.{i}."
        h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        attn, _ = F.multi_head_attention_forward(
            h.transpose(0, 1),
            h.transpose(0, 1),
            h.transpose(0, 1),
            x.shape[-1],
            heads,
            sd[p + "attn.in_proj_weight"],
            sd[p + "attn.in_proj_bias"],
            None,
            None,
            False,
            0.0,
            sd[p + "attn.out_proj.weight"],
            sd[p + "attn.out_proj.bias"],
            need_weights=False,
            attn_mask=mask,
        )
        x = x + attn.transpose(0, 1)
        h = F.layer_norm(x, x.shape[-1:], sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        h = F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


def _open_clip_image(sd, pixels, patch, layers, heads):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = _resblocks(x, sd, "visual.", layers, heads)
    x = F.layer_norm(x[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return x @ sd["visual.proj"]


def _open_clip_text(sd, ids, eos_id, layers, heads):
    n = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:n]
    mask = torch.full((n, n), float("-inf")).triu(1)  # causal
    x = _resblocks(x, sd, "", layers, heads, mask)
    x = F.layer_norm(x, x.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    # pooled at the end-of-text token (open_clip takes argmax of the ids: the same token
    # for OpenAI's vocabulary, where end-of-text has the highest id)
    eos = (ids == eos_id).int().argmax(dim=-1)
    return x[torch.arange(ids.shape[0]), eos] @ sd["text_projection"]


@pytest.fixture(scope="module")
def random_reference(tmp_path_factory) -> Path:
    """A small random CLIP of the tiny architecture, saved with the tiny tokenizer."""
    from transformers import CLIPModel

    tiny = load_clip("tiny")
    torch.manual_seed(3)
    model = CLIPModel(copy.deepcopy(tiny.model.config))
    path = tmp_path_factory.mktemp("random_ref")
    model.save_pretrained(path)
    tiny.tokenizer.save_pretrained(path)
    return path


def _open_clip_checkpoint(reference: Path, seed: int) -> dict[str, torch.Tensor]:
    ref = load_clip(str(reference)).model
    cfg = ref.config
    sd = _hf_to_open_clip(
        ref.state_dict(), cfg.vision_config.num_hidden_layers, cfg.text_config.num_hidden_layers
    )
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.05 * v.std().nan_to_num(0.0) * torch.randn(v.shape, generator=g)
        if v.numel() > 1
        else v
        for k, v in sd.items()
    }  # "fine-tuned"


def test_open_clip_mapping_matches_an_open_clip_forward(
    random_reference: Path, tmp_path: Path
) -> None:
    ref = load_clip(str(random_reference))
    cfg = ref.model.config
    sd = _open_clip_checkpoint(random_reference, seed=4)
    path = tmp_path / "epoch_3.pt"  # open_clip's training checkpoint layout, DDP prefix
    torch.save(
        {"epoch": 3, "name": "ft", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path
    )
    clip, details = load_open_clip(path, ref)
    assert details["text_tower_in_checkpoint"]
    v, t = cfg.vision_config, cfg.text_config
    pixels = torch.randn(
        5, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        want = _open_clip_image(
            sd, pixels, v.patch_size, v.num_hidden_layers, v.num_attention_heads
        )
        got = clip_image_encoder(clip)(pixels)
        assert (got - want).abs().max() < 1e-5
        assert (clip_image_encoder(ref.model)(pixels) - want).abs().max() > 1e-3  # moved
        batch = ref.tokenizer(
            ["a red circle", "a small blue square"], padding=True, return_tensors="pt"
        )
        want = _open_clip_text(
            sd, batch["input_ids"], t.eos_token_id, t.num_hidden_layers, t.num_attention_heads
        )
        pooled = clip.text_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
        assert (clip.text_projection(pooled) - want).abs().max() < 1e-5
    # the same tensors as safetensors, without the training-checkpoint wrapper
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ft.safetensors")
    again, _ = load_open_clip(tmp_path / "ft.safetensors", ref)
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.state_dict().values(), clip.state_dict().values(), strict=True)
    )


def test_open_clip_checkpoint_is_measured(random_reference: Path, tmp_path: Path) -> None:
    sd = _open_clip_checkpoint(random_reference, seed=5)
    path = tmp_path / "ft.pt"
    torch.save(sd, path)
    got = measure(
        str(path),
        tmp_path / "m",
        reference=str(random_reference),
        dataset="shapes-layout",
        zeroshot=[TASK],
        overrides=SMALL,
    )
    fin = got["provenance"]["finetuned"]
    assert fin["format"] == "open_clip" and fin["text_tower"] == "fine-tuned"
    assert got["final"]["aux"]["weight_drift"] > 0.01
    # zero-shot "after" from the independent open_clip forward, own text tower
    ref = load_clip(str(random_reference))
    cfg = ref.model.config
    v, t = cfg.vision_config, cfg.text_config
    task = load_task(TASK, "test", image_size=32)
    prompts = [tpl.format(c) for c in task.class_names for tpl in task.templates]
    ids = ref.tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        text = F.normalize(
            _open_clip_text(sd, ids, t.eos_token_id, t.num_hidden_layers, t.num_attention_heads),
            dim=-1,
        )
        text = F.normalize(
            text.view(len(task.class_names), len(task.templates), -1).mean(1), dim=-1
        )
        image = _open_clip_image(
            sd,
            ref.preprocessor()(task.images),
            v.patch_size,
            v.num_hidden_layers,
            v.num_attention_heads,
        )
    expected = float(
        ((F.normalize(image, dim=-1) @ text.T).argmax(-1) == task.labels).float().mean()
    )
    assert got["zeroshot"][TASK]["after"] == pytest.approx(expected, abs=1.5 / len(task))


def test_open_clip_refusals(random_reference: Path) -> None:
    cfg = load_clip(str(random_reference)).model.config
    sd = _open_clip_checkpoint(random_reference, seed=6)
    with pytest.raises(ExternalModelError, match="attn_pool"):
        open_clip_to_hf({**sd, "visual.attn_pool.query": torch.zeros(1)})
    with pytest.raises(ArchitectureMismatch, match="patch 32, width 768"):
        check_open_clip_name("ViT-B-32", cfg)
    with pytest.raises(ExternalModelError, match="OpenAI-style ViTs only"):
        check_open_clip_name("RN50", cfg)


# --- errors, one line, exit status 2 ----------------------------------------------------------


def _cli(*args: str):
    result = CliRunner().invoke(app, ["measure", *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines


def test_cli_errors_are_one_line(tmp_path: Path, random_reference: Path) -> None:
    from transformers import CLIPModel

    base = ["--reference", "tiny", "--data", "shapes-layout", "--out", str(tmp_path / "o")]
    code, lines = _cli(str(tmp_path / "nope"), *base)
    assert code == 2 and len(lines) == 1 and "no such file" in lines[0]
    (tmp_path / "junk").mkdir()
    code, lines = _cli(str(tmp_path / "junk"), *base)
    assert code == 2 and len(lines) == 1 and "unknown format" in lines[0]
    (tmp_path / "w.txt").write_text("x")
    code, lines = _cli(str(tmp_path / "w.txt"), *base)
    assert code == 2 and len(lines) == 1 and "unknown format" in lines[0]
    small = copy.deepcopy(load_clip("tiny").model.config)
    small.vision_config.num_hidden_layers = 2
    CLIPModel(small).save_pretrained(tmp_path / "two_layers")
    code, lines = _cli(str(tmp_path / "two_layers"), *base)
    assert code == 2 and len(lines) == 1
    assert "vision num_hidden_layers is 2 there and 4 in the reference" in lines[0]
    code, lines = _cli(str(tmp_path / "two_layers"), *base, "--set", "train.lr=1")
    assert code == 2 and len(lines) == 1 and "data.*, probe.*" in lines[0]
    code, lines = _cli(str(TINY_CLIP_DIR), "--reference", "tiny", "--out", str(tmp_path / "o"))
    assert code == 2 and "--data" in lines[0]
    sd = _open_clip_checkpoint(random_reference, seed=7)
    torch.save({k: v for k, v in sd.items() if ".resblocks.3." not in k}, tmp_path / "3.pt")
    code, lines = _cli(
        str(tmp_path / "3.pt"),
        "--reference",
        str(random_reference),
        "--data",
        "shapes-layout",
        "--zeroshot",
        TASK,
        "--out",
        str(tmp_path / "o"),
    )
    # 16 tensors per CLIP layer
    assert code == 2 and len(lines) == 1 and "lacks 16 vision tensors" in lines[0]


# --- a store of measured records reports like any runs -----------------------------------------


def test_report_and_compare_render_measured_records(full_ft_run: Path, tmp_path: Path) -> None:
    from attndrift.report import build_report

    store = tmp_path / "store"
    measure(str(full_ft_run), store / "run", reference="tiny", name="attndrift-full-ft")
    path, _ = _adapter(tmp_path, ["q_proj", "v_proj"], seed=8)
    for seed in (0, 1):  # two "seeds" of one recipe: replicates of one setting
        measure(
            str(path),
            store / f"peft{seed}",
            reference="tiny",
            dataset="shapes-layout",
            zeroshot=[TASK],
            overrides=SMALL,
            name=f"lora-elsewhere-s{seed}",
            recipe="lora-elsewhere",
            seed=seed,
            lr=1e-3,
        )
    result = build_report(store, tmp_path / "report")
    assert result.counts == {"completed": 3}
    html = result.html.read_text()
    for name in ("attndrift-full-ft", "lora-elsewhere-s0", "lora-elsewhere-s1", "measured"):
        assert name in html
    assert "external.recipe" not in html and "best lr nan" not in html  # issue 22 item 6
    import csv

    with open(tmp_path / "report" / "tables" / "matched_lr.csv") as fh:  # mean over seeds
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert rows["measured lora-elsewhere"]["n"] == "2"  # the two seeds: one setting
    assert rows["measured attndrift-full-ft"]["n"] == "1"
    assert (
        read_record(store / "run")["config"]["train"]["lr"]
        == read_record(full_ft_run)["config"]["train"]["lr"]
    )  # a run knows its learning rate
    cli = ["measure", str(path), "--reference", "tiny", "--data", "shapes-layout"]
    cli += ["--zeroshot", TASK, "--set", SMALL[0], "--set", SMALL[1], "--out", str(store / "no_lr")]
    out = CliRunner().invoke(app, cli)
    assert out.exit_code == 0 and "measured" in out.output, out.output
    out = CliRunner().invoke(app, ["compare", str(store / "run"), str(store / "no_lr")])
    assert out.exit_code == 0, out.output
    assert re.search(r"external\s+│\s+-\s+│", out.output)  # no learning rate known: "-"


# --- docs/measure.md runs as written ------------------------------------------------------------


def test_docs_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docs" / "measure.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "measure_docs"}
    exec(compile("\n".join(blocks), "docs/measure.md", "exec"), namespace)
    record = namespace["record"]
    assert record["config"]["method"] == "external"
    assert math.isfinite(record["final"]["delta_pct"]["entropy"])
    assert (tmp_path / "report" / "report.html").is_file()
