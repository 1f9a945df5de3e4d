"""Zero-shot classification: frozen text tower against whatever image encoder is passed in.

The image side is always a callable supplied by the caller, so a fine-tuned or LoRA-adapted
encoder is what gets evaluated (the study first evaluated LoRA models without their adapters).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from attndrift.data.base import ImageTask, Preprocessor

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]  # pixel_values [B,3,S,S] -> [B, D]


def clip_image_encoder(clip: torch.nn.Module) -> ImageEncoder:
    """The image branch of a transformers `CLIPModel`: vision tower -> visual projection."""

    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
        return clip.visual_projection(pooled)

    return encode


@torch.no_grad()
def text_classifier(clip: torch.nn.Module, tokenizer, class_names: list[str],
                    templates: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """Class weights ``[C, D]``: per class, the renormalised mean of its normalised prompt
    embeddings over all templates (CLIP's prompt ensembling)."""
    prompts = [t.format(name) for name in class_names for t in templates]
    batch = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    pooled = clip.text_model(**batch).pooler_output
    emb = F.normalize(clip.text_projection(pooled).float(), dim=-1)
    emb = emb.view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def encode_images(encode: ImageEncoder, images: torch.Tensor, preprocess: Preprocessor,
                  device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """Normalised image embeddings ``[N, D]`` (float32) of uint8 images ``[N, 3, H, W]``."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = preprocess(images[start : start + batch_size].to(device, non_blocking=True))
        out.append(F.normalize(encode(x).float(), dim=-1))
    return torch.cat(out)


def classification_scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float | None]:
    """Top-1 accuracy, top-5 accuracy and mean per-class recall of ``logits`` ``[N, C]``
    against ``labels`` ``[N]``. Mean per-class recall averages, over the classes present in
    ``labels``, the share of each class's images predicted as it (balanced accuracy). Top-5
    is None with five classes or fewer, where it is trivially 1."""
    labels = labels.to(logits.device)
    pred = logits.argmax(dim=-1)
    hit = (pred == labels).double()
    classes = torch.unique(labels)
    recall = torch.stack([hit[labels == c].mean() for c in classes])
    top5 = None
    if logits.shape[1] > 5:
        top = logits.topk(5, dim=-1).indices
        top5 = float((top == labels[:, None]).any(dim=-1).double().mean())
    return {"top1": int(hit.sum()) / len(labels), "top5": top5,
            "mean_recall": float(recall.mean())}


@torch.no_grad()
def zeroshot_scores(encode: ImageEncoder, text_weights: torch.Tensor, task: ImageTask,
                    preprocess: Preprocessor, device: torch.device | str = "cpu",
                    batch_size: int = 256) -> dict[str, float | None]:
    """`classification_scores` of nearest-prompt classification of ``task`` through
    ``encode``."""
    feats = encode_images(encode, task.images, preprocess, device, batch_size)
    return classification_scores((feats @ text_weights.to(feats.device).T).cpu(), task.labels)


@torch.no_grad()
def zeroshot_accuracy(encode: ImageEncoder, text_weights: torch.Tensor, task: ImageTask,
                      preprocess: Preprocessor, device: torch.device | str = "cpu",
                      batch_size: int = 256) -> float:
    """Top-1 accuracy of nearest-prompt classification of ``task`` through ``encode``."""
    feats = encode_images(encode, task.images, preprocess, device, batch_size)
    pred = (feats @ text_weights.to(feats.device).T).argmax(dim=-1).cpu()
    return int((pred == task.labels).sum()) / max(1, len(task))  # exact, as the scores
