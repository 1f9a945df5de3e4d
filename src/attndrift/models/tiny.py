"""The shipped tiny CLIP's architecture and its word-level tokenizer.

The model is a transformers `CLIPModel` (so every code path that handles real CLIP checkpoints
handles it too) scaled down to ~0.33M parameters for the 32x32 ``shapes`` world: a ViT with 8x8
patches (16 patches + CLS), 4 layers of width 64 and 4 heads; a 2-layer text transformer over a
closed word-level vocabulary (`attndrift.data.shapes.vocabulary`), which is all the world's
language needs and keeps the embedding table tiny.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import CLIPConfig, PreTrainedTokenizerFast

# Special tokens and their fixed ids. CLIP's text tower pools the hidden state at the first
# ``eos_token_id`` of each sequence, except that eos_token_id == 2 selects a legacy rule
# (argmax of the input ids, i.e. "the largest id is eos"), which a word-level vocabulary breaks.
# So eos gets id 3, and the post-processor appends it to every sequence.
PAD, BOS, UNK, EOS = "<pad>", "<bos>", "<unk>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, UNK, EOS)
PAD_ID, BOS_ID, UNK_ID, EOS_ID = range(4)

MAX_TEXT_LENGTH = 24  # tokens including bos and eos; the longest caption of the world has 15


def tiny_clip_config(vocab_size: int, *, image_size: int = 32, patch_size: int = 8,
                     width: int = 64, vision_layers: int = 4, text_layers: int = 2,
                     heads: int = 4, mlp_ratio: int = 4, projection_dim: int = 64,
                     max_text_length: int = MAX_TEXT_LENGTH) -> CLIPConfig:
    """A `CLIPConfig` for the tiny CLIP (defaults: the shipped model, ~0.33M parameters)."""
    common = {"hidden_size": width, "intermediate_size": mlp_ratio * width,
              "num_attention_heads": heads, "hidden_act": "quick_gelu", "projection_dim":
              projection_dim, "attention_dropout": 0.0}
    text = {**common, "vocab_size": vocab_size, "num_hidden_layers": text_layers,
            "max_position_embeddings": max_text_length,
            "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    vision = {**common, "num_hidden_layers": vision_layers, "image_size": image_size,
              "patch_size": patch_size, "num_channels": 3}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def build_tokenizer(words: Iterable[str],
                    max_length: int = MAX_TEXT_LENGTH) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (plus the four special tokens).

    Text is lower-cased and split on whitespace and punctuation (tokenizers' `Whitespace`
    pre-tokenizer: runs of word characters, runs of punctuation); every sequence is wrapped in
    ``<bos> ... <eos>``, truncated to ``max_length`` (eos kept) and padded with ``<pad>`` on the
    right. Saved with ``save_pretrained`` it reloads offline with ``AutoTokenizer``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(set(words)):
        if w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=max_length, padding_side="right", truncation_side="right",
        model_input_names=["input_ids", "attention_mask"])
