"""Real-dataset and real-backbone code paths, on a tiny CLIP saved with save_pretrained and
datasets written to disk in Hugging Face and ImageFolder formats (nothing is downloaded)."""

import json
import shutil

import pytest
import torch
from PIL import Image

from attndrift.config import load_config
from attndrift.data.hf import DatasetUnavailable, parse_hf_name
from attndrift.data.names import FLOWERS102, ClassNameError, prompt_names
from attndrift.data.registry import load_task
from attndrift.models.clip import TINY_CLIP_DIR, ModelUnavailable, load_clip
from attndrift.train import run

datasets = pytest.importorskip("datasets")
RUN = ["train.epochs=1", "train.batch_size=16", "probe.per_epoch=1", "probe.images=12",
       "probe.subsets=2", "data.zeroshot=[shapes-zs-shape]", "data.eval_batch_size=128"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The shipped tiny CLIP re-saved with save_pretrained: a 'real' local checkpoint."""
    out = tmp_path_factory.mktemp("clip")
    loaded = load_clip("tiny")
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    shutil.copy(TINY_CLIP_DIR / "preprocessor_config.json", out)
    return out


def _colour_split(split: str, n: int):
    # The tiny CLIP knows colour words, so correct names give high zero-shot accuracy.
    task = load_task("shapes-zs-colour", "test")
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    idx = torch.randperm(len(task), generator=g)[:n]
    return task.images[idx], task.labels[idx], task.class_names


def _write_hf(root, names, shuffle_names=False):
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=names)})
    parts = {}
    for split, n in (("train", 160), ("test", 60)):
        images, labels, _ = _colour_split(split, n)
        pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
        parts[split] = datasets.Dataset.from_dict({"image": pil, "label": labels.tolist()},
                                                  features=feats)
    datasets.DatasetDict(parts).save_to_disk(str(root))


def _write_imagefolder(root, names):
    for split, n in (("train", 160), ("test", 60)):
        images, labels, _ = _colour_split(split, n)
        for i, (im, y) in enumerate(zip(images, labels, strict=True)):
            d = root / split / names[int(y)].replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(d / f"{i}.png")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNDRIFT_CACHE", str(tmp_path / "cache"))


def test_hf_on_disk_dataset_runs_through_the_registry_path(tmp_path, model_dir, monkeypatch):
    names = load_task("shapes-zs-colour", "test").class_names
    # Stored under the hub id of a registered dataset: the same code path as the real id.
    monkeypatch.setenv("ATTNDRIFT_DATA_ROOT", str(tmp_path / "mirror"))
    _write_hf(tmp_path / "mirror" / "tanganke" / "eurosat", names)
    task = load_task("eurosat", "train", image_size=32)
    assert len(task) == 160 and task.images.dtype == torch.uint8
    assert task.class_names == names and task.templates[0].startswith("a centered satellite")
    rec = run(load_config(None, [f"model={model_dir}", "data.dataset=eurosat", *RUN]),
              tmp_path / "run", progress=False)
    assert rec["status"] == "completed" and rec["warnings"] == []
    data = rec["provenance"]["data"]
    assert len(data["content"]) == 16 and len(data["probe_ids"]) == 2
    assert rec["provenance"]["model_source"] == str(model_dir)
    assert all(s["ok"] for s in rec["sanity"].values())
    # decoded once: the second load comes from the uint8 cache
    assert list((tmp_path / "cache" / "datasets").glob("eurosat-train-*.safetensors"))


def test_shuffled_class_names_trigger_the_sanity_warning(tmp_path, model_dir):
    names = load_task("shapes-zs-colour", "test").class_names
    shuffled = names[1:] + names[:1]  # every image now carries a wrong colour word
    _write_hf(tmp_path / "ds", shuffled)
    rec = run(load_config(None, [f"model={model_dir}", f"data.dataset=hf:{tmp_path / 'ds'}",
                                 *RUN]), tmp_path / "run", progress=False)
    key = f"hf:{tmp_path / 'ds'} (validation)"
    assert rec["sanity"][key]["ok"] is False
    assert any("within 1.5x of chance" in w for w in rec["warnings"])
    on_disk = json.loads((tmp_path / "run" / "record.json").read_text())
    assert on_disk["warnings"] == rec["warnings"]


def test_imagefolder_dataset(tmp_path, model_dir):
    names = load_task("shapes-zs-colour", "test").class_names
    _write_imagefolder(tmp_path / "folder", names)
    task = load_task(f"imagefolder:{tmp_path / 'folder'}", "test", image_size=32)
    assert len(task) == 60 and task.class_names == sorted(names)
    rec = run(load_config(None, [f"model={model_dir}",
                                 f"data.dataset=imagefolder:{tmp_path / 'folder'}", *RUN]),
              tmp_path / "run", progress=False)
    assert rec["status"] == "completed" and rec["sanity"]
    with pytest.raises(FileNotFoundError, match="no validation/ directory"):
        load_task(f"imagefolder:{tmp_path / 'folder'}", "validation")


def test_mixed_size_images_are_cached_resized_and_cropped(tmp_path):
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=["red", "blue"])})
    pil = [Image.new("RGB", (40 + 7 * i, 30 + 3 * i), (255 * (i % 2), 0, 0)) for i in range(20)]
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"image": pil, "label": [i % 2 for i in range(20)]}, features=feats)}).save_to_disk(
        str(tmp_path / "mixed"))
    task = load_task(f"hf:{tmp_path / 'mixed'}", "test", image_size=24)
    assert tuple(task.images.shape) == (20, 3, 24, 24)
    assert int(task.images[1, 0].max()) == 255 and int(task.images[0, 0].max()) == 0


def test_class_name_rules():
    assert prompt_names(["american_bulldog", "SeaLake"]) == ["american bulldog", "sea lake"]
    with pytest.raises(ClassNameError, match="a photo of a 17"):
        prompt_names(["17", "3"], source="flowers")
    # numeric names map by value onto the official names, whatever their order
    raw = sorted(str(i) for i in range(1, 103))  # "1", "10", "100", ...
    names = prompt_names(raw, canonical=FLOWERS102)
    assert names[0] == FLOWERS102[0] and names[1] == FLOWERS102[9]
    assert len(set(FLOWERS102)) == 102
    src = parse_hf_name("hf:org/ds@v2?image=img&label=fine_label")
    assert (src.id, src.revision, src.image, src.label) == ("org/ds", "v2", "img", "fine_label")
    with pytest.raises(ValueError, match="unknown"):
        parse_hf_name("hf:org/ds?colour=x")


def test_missing_model_and_dataset_name_what_is_missing():
    with pytest.raises(ModelUnavailable, match=r"openai/clip-vit-base-patch32.*save_pretrained"):
        load_clip("openai/clip-vit-base-patch32")
    with pytest.raises(DatasetUnavailable, match=r"uoft-cs/cifar100.*save_to_disk"):
        load_task("cifar100", "test")


def test_non_standard_backbone_end_to_end(tmp_path):
    """3 layers, 2 heads, 36 patches, projection 24: nothing may assume ViT-B/32 shapes."""
    from transformers import CLIPConfig, CLIPModel

    tiny = load_clip("tiny")
    cfg = CLIPConfig(
        text_config={**tiny.model.config.text_config.to_dict(), "hidden_size": 32,
                     "intermediate_size": 64, "num_attention_heads": 2,
                     "num_hidden_layers": 1},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
                       "num_attention_heads": 2, "image_size": 24, "patch_size": 4},
        projection_dim=24)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "odd")
    tiny.tokenizer.save_pretrained(tmp_path / "odd")
    rec = run(load_config(None, [f"model={tmp_path / 'odd'}", "method=lora",
                             "data.train_limit=160", *RUN]),
              tmp_path / "run", progress=False)
    assert rec["status"] == "completed"
    ent = rec["final"]["metrics"]["entropy"]
    assert len(ent["layers"]) == 3 and [len(h) for h in ent["heads"]] == [2, 2, 2]
    # 36 patches: uniform attention would have entropy ln 36
    assert max(rec["baseline"]["entropy"]["layers"]) <= torch.log(torch.tensor(36.0)) + 1e-5
