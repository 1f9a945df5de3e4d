"""Contrastive pretraining of the shipped tiny CLIP on the ``shapes`` world.

This is the recipe behind ``src/attndrift/models/tiny_clip/`` (``attndrift pretrain-tiny``):

- data: a fixed corpus of ``min(steps * batch_size, 50_000)`` image-caption pairs from
  `attndrift.data.shapes.annotated_corpus` (seeded by ``seed``), tokenized once, visited in
  seeded random order, a fresh permutation per epoch;
- model: `attndrift.models.tiny.tiny_clip_config` (~0.33M parameters), initialised under
  ``torch.manual_seed(seed)``;
- loss: CLIP's symmetric InfoNCE with the learnable logit scale (clamped at 100), in its
  multi-positive form: a caption counts as a positive for every image in the batch it is true
  of ("a circle" for every circle), with the target mass spread evenly over the positives.
  Plain InfoNCE would push "a photo of a circle." away from all but one circle in a batch,
  fighting exactly the zero-shot prompts the study evaluates;
- optimiser: AdamW (no weight decay on biases, norms, embeddings and the logit scale), linear
  warm-up then cosine decay, gradient-norm clipping at 1.

Everything is deterministic on CPU for a given seed: training runs single-threaded by default
(``threads=1``), so the weights do not depend on the machine's core count (they may still
differ across CPU instruction sets and torch versions). At the end the model,
tokenizer and preprocessor config are written, the directory is reloaded with
`attndrift.models.clip.load_clip` and its zero-shot accuracies are measured with
`attndrift.zeroshot` on the four shapes tasks; they go into ``MODEL_CARD.md`` and
``pretrain_info.json``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attndrift.data.base import Preprocessor
from attndrift.data.shapes import (
    ATTRIBUTES,
    annotated_corpus,
    caption_attributes,
    vocabulary,
)
from attndrift.models.tiny import build_tokenizer, tiny_clip_config

MAX_CORPUS = 50_000
# Per-channel statistics of the shapes world (measured on a 20k-image corpus, rounded); fixed
# constants rather than per-run estimates so every pretraining seed shares one preprocessing.
SHAPES_MEAN = (0.1960, 0.1812, 0.1728)
SHAPES_STD = (0.1875, 0.1424, 0.1448)
IMAGE_SIZE = 32
EVAL_TASKS = ("shapes-zs-shape", "shapes-zs-colour", "shapes-layout", "shapes-objects")
MAX_LOGIT_SCALE = math.log(100.0)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not biases, norms, embeddings, the logit scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(steps: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _embed(model: torch.nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor,
           attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Towers + projections directly: in transformers 5 get_image_features/get_text_features
    # may return an output object instead of a tensor.
    img = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
    txt = model.text_projection(model.text_model(input_ids=input_ids,
                                                 attention_mask=attention_mask).pooler_output)
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def multi_positive_clip_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over image->text rows and text->image columns of ``logits [B, B]``,
    with ``positives[i, j]`` = caption j is true of image i (the diagonal always is)."""
    pos = positives.float()
    t_img = pos / pos.sum(dim=1, keepdim=True)  # each image's positive captions
    t_txt = pos / pos.sum(dim=0, keepdim=True)  # each caption's positive images
    loss_img = -(t_img * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_txt = -(t_txt * F.log_softmax(logits, dim=0)).sum(dim=0).mean()
    return (loss_img + loss_txt) / 2


def _positives(img_attrs: dict[str, torch.Tensor],
               cap_attrs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, B]`` bool: caption j mentions no attribute value that image i lacks."""
    ok = torch.ones(img_attrs["shape"].shape[0], cap_attrs["shape"].shape[0], dtype=torch.bool)
    for key in ATTRIBUTES:
        c = cap_attrs[key][None, :]
        ok &= (c < 0) | (c == img_attrs[key][:, None])
    return ok


@torch.no_grad()
def evaluate_zeroshot(source: str) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy (and chance) of the CLIP at ``source`` on the shapes tasks' test sets,
    through `attndrift.zeroshot` (the same code that evaluates fine-tuned models)."""
    from attndrift.data.registry import load_task
    from attndrift.models.clip import load_clip
    from attndrift.zeroshot import clip_image_encoder, text_classifier, zeroshot_accuracy

    loaded = load_clip(source)
    encode = clip_image_encoder(loaded.model)
    out = {}
    for name in EVAL_TASKS:
        task = load_task(name, "test")
        weights = text_classifier(loaded.model, loaded.tokenizer, task.class_names,
                                  task.templates)
        acc = zeroshot_accuracy(encode, weights, task, loaded.preprocessor())
        out[name] = {"accuracy": acc, "chance": 1.0 / task.num_classes,
                     "classes": task.num_classes, "images": len(task)}
    return out


def _display(out_dir: Path) -> str:
    """``out_dir`` as the card's command should show it (repo-relative for the shipped dir)."""
    from attndrift.models.clip import TINY_CLIP_DIR

    if out_dir.resolve() == TINY_CLIP_DIR.resolve():
        return "src/attndrift/models/tiny_clip"
    return str(out_dir)


def _write_card(out_dir: Path, info: dict) -> None:
    zs = info["zeroshot"]
    rows = "\n".join(
        f"| {name} | {v['classes']} | {v['images']} | {100 * v['accuracy']:.1f}% | "
        f"{100 * v['chance']:.1f}% |" for name, v in zs.items())
    cfg = info["config"]
    side, patch = cfg["image_size"], cfg["patch_size"]
    command = (f"attndrift pretrain-tiny --out {info['out']} --steps {info['steps']} "
               f"--seed {info['seed']} --batch-size {info['batch_size']}")
    text = f"""# attndrift tiny CLIP

A {info['parameters']:,}-parameter transformers `CLIPModel` pretrained contrastively on the
procedurally generated **shapes** world that ships with attndrift
(`attndrift.data.shapes`). It exists so that the whole attndrift pipeline (fine-tuning,
attention probes, zero-shot forgetting) runs offline on a CPU; it is not a model of natural
images. Load it with `attndrift.models.clip.load_clip("tiny")`.

## The world

32x32 RGB images of one object on a grey textured background. Attributes: shape (circle,
square, triangle, cross, diamond, ring, star, heart), colour (red, green, blue, yellow,
purple, orange), size (small, large), position (top left, top right, center, bottom left,
bottom right), background (plain, striped, dotted, checkered, noisy), plus continuous jitter.
Captions name random subsets of the attributes ("a photo of a large red circle at the top
left on a striped background.", "a green star", "a small shape at the center").

## Architecture

- vision: ViT, {side}x{side} input, {patch}x{patch} patches ({cfg['patches']} patches + CLS),
  {cfg['vision_layers']} layers, width {cfg['width']}, {cfg['heads']} heads, MLP \
{cfg['intermediate']}
- text: {cfg['text_layers']}-layer causal transformer, width {cfg['width']}, \
{cfg['heads']} heads, word-level vocabulary of {cfg['vocab_size']} tokens
  (`<pad>`=0, `<bos>`=1, `<unk>`=2, `<eos>`=3; pooled at `<eos>`), at most \
{cfg['max_text_length']} tokens
- projection dimension {cfg['projection_dim']}; parameters: {info['parameters']:,}
- preprocessing: 32x32, mean {list(info['image_mean'])}, std {list(info['image_std'])}

## How it was made

```
{command}
```

Contrastive pretraining (`attndrift.pretrain.pretrain_tiny`): {info['steps']} steps of batch
{info['batch_size']} over a fixed corpus of {info['corpus_size']:,} image-caption pairs
(seed {info['seed']}), multi-positive symmetric InfoNCE with a learnable logit scale (a caption
is a positive for every image in the batch it is true of), AdamW (lr {info['lr']}, weight
decay {info['weight_decay']}, {info['warmup_steps']} warm-up steps, cosine decay), gradient
clipping at 1. Loss {info['loss_first']:.3f} (first steps) -> {info['loss_last']:.3f} (last
steps); final logit scale {info['logit_scale']:.1f}.
Wall time {info['seconds']:.0f} s of training on {info['machine']} (torch {info['torch']},
transformers {info['transformers']}, torch threads: {info['threads']}; the machine may have been
shared with other jobs).

## Zero-shot accuracy (test splits, prompt ensembles of the tasks' templates)

| task | classes | images | accuracy | chance |
|---|---|---|---|---|
{rows}

Measured after reloading this directory with `load_clip`, through `attndrift.zeroshot`.
`shapes-zs-shape` and `shapes-zs-colour` are the zero-shot transfer tasks whose loss under
fine-tuning the study measures; `shapes-layout` and `shapes-objects` are the fine-tuning tasks.
"""
    (out_dir / "MODEL_CARD.md").write_text(text)


def pretrain_tiny(out_dir: Path, *, steps: int = 1500, batch_size: int = 128,
                  lr: float = 1e-3, weight_decay: float = 0.05, seed: int = 0,
                  threads: int | None = 1, progress: bool = True) -> dict:
    """Pretrain the tiny CLIP, write it to ``out_dir`` and return its zero-shot accuracies.

    ``threads`` is torch's intra-op thread count while training (restored afterwards). The
    default, 1, is barely slower than 2 for a model this small, makes the weights independent
    of the machine's core count, and avoids OpenMP oversubscription, which on a shared 2-core
    machine slowed 2-thread steps down 20x. ``None`` leaves torch's setting alone.

    Returns (and writes to ``pretrain_info.json``) the steps, seconds, losses and, per shapes
    task, ``{"accuracy", "chance", "classes", "images"}`` under ``"zeroshot"``; also flat
    ``zs_<task>`` accuracy keys for convenience.
    """
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {steps}, {batch_size}")
    out_dir = Path(out_dir)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _pretrain(out_dir, steps, batch_size, lr, weight_decay, seed, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(out_dir: Path, steps: int, batch_size: int, lr: float, weight_decay: float,
              seed: int, progress: bool) -> dict:
    import transformers
    from transformers import CLIPModel

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    tokenizer = build_tokenizer(vocabulary())
    config = tiny_clip_config(len(tokenizer))
    model = CLIPModel(config)
    model.train()

    n_corpus = min(steps * batch_size, MAX_CORPUS)
    images, captions, img_attrs = annotated_corpus(n_corpus, seed)
    cap_attrs = caption_attributes(captions)
    tok = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    input_ids, attention_mask = tok["input_ids"], tok["attention_mask"]
    preprocess = Preprocessor(IMAGE_SIZE, SHAPES_MEAN, SHAPES_STD)

    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98),
                            eps=1e-6)
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup))

    losses: list[float] = []
    order = torch.randperm(n_corpus, generator=gen)
    cursor = 0
    bar = None
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        bar = Progress(TextColumn("pretrain-tiny"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())
        bar.start()
        bar_task = bar.add_task("pretrain", total=steps, loss=float("nan"))
    try:
        for step in range(steps):
            if cursor + batch_size > n_corpus:  # new epoch: a fresh seeded permutation
                order, cursor = torch.randperm(n_corpus, generator=gen), 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            length = int(attention_mask[idx].sum(dim=1).max())  # trim padding to the batch
            img, txt = _embed(model, preprocess(images[idx]), input_ids[idx, :length],
                              attention_mask[idx, :length])
            logits = model.logit_scale.exp() * img @ txt.T
            positives = _positives({k: v[idx] for k, v in img_attrs.items()},
                                   {k: v[idx] for k, v in cap_attrs.items()})
            loss = multi_positive_clip_loss(logits, positives)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():  # CLIP clamps the temperature at 1/100
                model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
            if bar is not None and (step % 10 == 0 or step == steps - 1):
                bar.update(bar_task, completed=step + 1, loss=losses[-1])
    finally:
        if bar is not None:
            bar.stop()
    train_seconds = time.perf_counter() - t0

    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # safetensors creates its file owner-only (0600); the shipped copy must be readable by
    # whoever installs the package.
    (out_dir / "model.safetensors").chmod(0o644)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True,
        "size": {"shortest_edge": IMAGE_SIZE}, "do_center_crop": True,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(SHAPES_MEAN),
        "image_std": list(SHAPES_STD), "do_convert_rgb": True, "resample": 3,
    }, indent=2) + "\n")

    zeroshot = evaluate_zeroshot(str(out_dir))
    k = max(1, min(50, steps // 10))  # losses are noisy: average the first/last k steps
    vc, tc = config.vision_config, config.text_config
    info = {
        "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "warmup_steps": warmup, "seed": seed, "corpus_size": n_corpus, "out": _display(out_dir),
        "seconds": round(train_seconds, 1),
        "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
        "loss_curve": [round(sum(losses[i : i + k]) / len(losses[i : i + k]), 4)
                       for i in range(0, steps, k)],
        "logit_scale": model.logit_scale.detach().exp().item(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_mean": list(SHAPES_MEAN), "image_std": list(SHAPES_STD),
        "config": {"image_size": vc.image_size, "patch_size": vc.patch_size,
                   "patches": (vc.image_size // vc.patch_size) ** 2,
                   "vision_layers": vc.num_hidden_layers, "text_layers": tc.num_hidden_layers,
                   "width": vc.hidden_size, "heads": vc.num_attention_heads,
                   "intermediate": vc.intermediate_size, "vocab_size": tc.vocab_size,
                   "max_text_length": tc.max_position_embeddings,
                   "projection_dim": config.projection_dim},
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zeroshot": zeroshot,
        **{f"zs_{name}": v["accuracy"] for name, v in zeroshot.items()},
    }
    (out_dir / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")
    _write_card(out_dir, info)
    return info
