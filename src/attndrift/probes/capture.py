"""Capture a CLIP vision transformer's CLS attention row from q_proj/k_proj forward hooks.

Under SDPA (transformers' default attention) the attention weights are never materialised, and
asking for ``output_attentions`` changes the kernel and returns every ``T x T`` map. The study
only needs the CLS query's row, so ``AttentionProbe`` hooks the query and key projections of
each encoder layer and recomputes just that row::

    attn[b, h, :] = softmax_j((q[b, 0, h] . k[b, j, h]) * scale)          -> [B, H, T]

with ``T = 1 + num_patches``. This matches the model's own attention for any attention
implementation (eager, SDPA, flash), because the vision tower uses no mask. Whatever module sits
at ``self_attn.q_proj`` / ``self_attn.k_proj`` when the probe is entered is hooked, so a PEFT
LoRA wrapper's deltas are part of the captured attention.

``cls_patch_attention`` is the one-call convenience for monitoring: run the vision tower on a
batch and return the renormalised CLS->patch maps ``[B, L, H, N]``.

``AttentionProbe(..., full=True)`` and ``full_attention`` keep every query's row instead, the
full ``T x T`` maps ``[B, L, H, T, T]`` that rollout and patch-to-patch metrics need; they cost
``T`` times the memory of the CLS row, so they are computed only where a metric needs them.

Supported towers: CLIP-style (``.encoder.layers[i].self_attn.q_proj/k_proj``: CLIP, and the
CLIP family that shares its layout) and transformers >= 5 ``ViTModel``
(``.layers[i].attention.q_proj/k_proj``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn

from attndrift.probes.metrics import renormalize_patches

__all__ = [
    "AttentionProbe",
    "cls_patch_attention",
    "find_encoder_layers",
    "find_vision_tower",
    "full_attention",
]

# Where a layer keeps its attention module: CLIP-style towers use ``self_attn``, transformers
# >= 5 ViT uses ``attention`` (with q_proj/k_proj; ViT < 5 had query/key and is not supported).
_ATTENTION_ATTRS = ("self_attn", "attention")
SUPPORTED = (
    "CLIP-style vision towers (.encoder.layers[i].self_attn.q_proj/k_proj) and transformers>=5 "
    "ViTModel (.layers[i].attention.q_proj/k_proj)"
)


def _attention_module(layer: nn.Module) -> nn.Module | None:
    """The layer's attention module if it exposes ``q_proj`` and ``k_proj``, else None."""
    for attr in _ATTENTION_ATTRS:
        attn = getattr(layer, attr, None)
        if isinstance(attn, nn.Module) and all(
            isinstance(getattr(attn, name, None), nn.Module) for name in ("q_proj", "k_proj")
        ):
            return attn
    return None


def _has_qk(layer: nn.Module) -> bool:
    return _attention_module(layer) is not None


def _heads_and_scale(attn: nn.Module) -> tuple[int, float]:
    """Head count and logit scale of an attention module (CLIP: num_heads/scale; ViT:
    num_attention_heads/scaling)."""
    heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
    scale = getattr(attn, "scale", None)
    if not isinstance(scale, float | int):
        scale = getattr(attn, "scaling", None)
    if not isinstance(heads, int) or not isinstance(scale, float | int):
        raise ValueError(f"{type(attn).__name__} exposes no head count / scale; supported: "
                         f"{SUPPORTED}")
    return heads, float(scale)


def _is_text_tower(module: nn.Module) -> bool:
    """A CLIP text tower: token embeddings and no patch embedding (causal mask, no patches)."""
    emb = getattr(module, "embeddings", None)
    return hasattr(emb, "token_embedding") and not hasattr(emb, "patch_embedding")


def _has_patch_embedding(module: nn.Module) -> bool:
    emb = getattr(module, "embeddings", None)
    # CLIP: patch_embedding (a conv); ViT: patch_embeddings (a module holding the conv).
    return hasattr(emb, "patch_embedding") or hasattr(emb, "patch_embeddings")


def _is_vision_tower(name: str, module: nn.Module) -> bool:
    return _has_patch_embedding(module) or "vision" in name.split(".")[-1]


def _candidate_layers(module: nn.Module) -> nn.ModuleList | None:
    layers = getattr(getattr(module, "encoder", None), "layers", None)
    if layers is None and _has_patch_embedding(module):
        layers = getattr(module, "layers", None)  # transformers >= 5 ViTModel: no .encoder
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    return layers


def _find_tower(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    fallback: tuple[nn.Module, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        layers = _candidate_layers(module)
        if layers is None:
            continue
        if not all(_has_qk(layer) for layer in layers) or _is_text_tower(module):
            continue
        if _is_vision_tower(name, module):
            return module, layers
        if fallback is None:
            fallback = (module, layers)
    if fallback is None:
        raise ValueError(
            f"no CLIP/ViT-style attention layers found in {type(model).__name__}: supported are "
            f"{SUPPORTED}"
        )
    return fallback


def find_encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The vision encoder's layer list inside ``model``.

    Searches ``model.named_modules()`` for modules with ``.encoder.layers`` (or, for a
    transformers >= 5 ``ViTModel``, ``.layers`` next to a patch embedding) whose layers have an
    attention module (``.self_attn`` or ``.attention``) with ``q_proj`` and ``k_proj``. A
    CLIPModel holds two such towers, so a module that looks like a vision tower (patch
    embedding, or "vision" in its attribute name) is preferred, and a CLIP text tower is never
    chosen (its causal mask would make the recomputed row wrong). Works through wrappers such
    as PEFT's ``PeftModel``.

    Raises:
        ValueError: if no such layers exist in ``model``.
    """
    return _find_tower(model)[1]


def find_vision_tower(model: nn.Module) -> nn.Module:
    """The module owning the vision encoder's layers (e.g. the ``CLIPVisionModel`` inside a
    ``CLIPModel``, classifier or ``PeftModel``): call it with ``pixel_values=``; its
    ``named_parameters()`` are the tower's weights.

    Raises:
        ValueError: if ``model`` contains no supported vision tower.
    """
    return _find_tower(model)[0]


def _resolve_layers(requested: Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    if requested is None:
        return tuple(range(n_layers))
    resolved = []
    for index in requested:
        if not -n_layers <= index < n_layers:
            raise ValueError(f"layer index {index} out of range for a {n_layers}-layer encoder")
        resolved.append(index % n_layers)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"duplicate layer indices in {list(requested)}")
    if not resolved:
        raise ValueError("layers must name at least one layer")
    return tuple(resolved)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Disable autocast so the logits and softmax really run in float32."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class _LayerHook:
    """Per-layer state: pairs up the CLS query (or all queries) and the keys of one forward,
    then scores them."""

    def __init__(self, probe: AttentionProbe, attn: nn.Module) -> None:
        self.probe = probe
        self.num_heads, self.scale = _heads_and_scale(attn)
        # [B, 1, D]: only the CLS query is kept ([B, T, D] when the probe is full)
        self.q_cls: torch.Tensor | None = None
        self.k: torch.Tensor | None = None  # [B, T, D], released as soon as the row is computed
        self.rows: list[torch.Tensor] = []  # one [B, H, T] ([B, H, T, T]) float32 per forward

    def on_q(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        self.q_cls = output if self.probe.full else output[:, :1]
        self._maybe_score()

    def on_k(self, _module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        self.k = output
        self._maybe_score()

    def _maybe_score(self) -> None:
        if self.q_cls is None or self.k is None:
            return
        q, k = self.q_cls, self.k
        self.q_cls = self.k = None
        grad = contextlib.nullcontext() if not self.probe.detach else torch.no_grad()
        with grad, _no_autocast(k.device):
            if self.probe.detach:
                q, k = q.detach(), k.detach()
            self.rows.append(self._full_rows(q, k) if self.probe.full else self._cls_row(q, k))

    def _cls_row(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        b, t, d = k.shape
        head_dim = d // self.num_heads
        qh = q.float().reshape(b, self.num_heads, head_dim)
        kh = k.float().reshape(b, t, self.num_heads, head_dim)
        logits = torch.einsum("bhd,bthd->bht", qh, kh) * self.scale
        return logits.softmax(dim=-1)

    def _full_rows(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        b, t, d = k.shape
        head_dim = d // self.num_heads
        qh = q.float().reshape(b, t, self.num_heads, head_dim)
        kh = k.float().reshape(b, t, self.num_heads, head_dim)
        logits = torch.einsum("bqhd,bkhd->bhqk", qh, kh) * self.scale
        return logits.softmax(dim=-1)

    def clear(self) -> None:
        self.q_cls = self.k = None
        self.rows = []


class AttentionProbe:
    """Context manager capturing the CLS attention row of a CLIP vision encoder.

    Example::

        with AttentionProbe(model) as probe:
            model(pixel_values=batch)
            rows = probe.pop()  # [B, L, H, T] float32

    Args:
        vision_model: a CLIP vision tower, a ``CLIPModel``, or any module containing one
            (including a PEFT ``PeftModel``).
        layers: encoder layer indices to capture (negative indices allowed), in the order they
            appear in the output; all layers if None.
        detach: True (monitoring) computes the rows under ``no_grad`` from detached q/k;
            False keeps the graph so a loss on the captured attention backpropagates into the
            model (e.g. a regulariser).
        full: False (default) keeps only the CLS query's row, ``[B, L, H, T]``; True keeps
            every query's row, so ``pop`` returns the full maps ``[B, L, H, T, T]``.

    Every forward through the encoder inside the context appends to the buffer; ``pop`` returns
    and clears it. Under gradient checkpointing, recomputation runs the hooks again, so pop
    before ``backward`` in that case.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        layers: Sequence[int] | None = None,
        *,
        detach: bool = True,
        full: bool = False,
    ) -> None:
        self.model = vision_model
        self.encoder_layers = find_encoder_layers(vision_model)
        self.layers = _resolve_layers(layers, len(self.encoder_layers))
        self.detach = detach
        self.full = full
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._state: list[_LayerHook] = []

    def __enter__(self) -> AttentionProbe:
        if self._handles:
            raise RuntimeError("AttentionProbe is already active; it cannot be entered twice")
        self._state = []
        try:
            for index in self.layers:
                # Looked up now, not at construction, so a LoRA wrapper injected in between is
                # the module hooked and its delta is part of q and k.
                attn = _attention_module(self.encoder_layers[index])
                state = _LayerHook(self, attn)
                self._handles.append(attn.q_proj.register_forward_hook(state.on_q))
                self._handles.append(attn.k_proj.register_forward_hook(state.on_k))
                self._state.append(state)
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for state in self._state:
            # Drop any half-paired q/k from an interrupted forward; keep captured rows for pop().
            state.q_cls = state.k = None

    @property
    def active(self) -> bool:
        """True while the hooks are registered."""
        return bool(self._handles)

    def pop(self) -> torch.Tensor:
        """CLS rows captured since the last pop, ``[B_total, L, H, T]`` float32 (full maps
        ``[B_total, L, H, T, T]`` for a ``full`` probe); clears them.

        Raises:
            RuntimeError: if nothing was captured, or the layers saw different numbers of
                forwards (e.g. a forward interrupted part-way).
        """
        counts = [len(state.rows) for state in self._state]
        try:
            if not counts or max(counts) == 0:
                raise RuntimeError(
                    "no attention captured: the model's forward did not run q_proj/k_proj of "
                    f"layers {list(self.layers)} inside the probe"
                )
            if min(counts) != max(counts):
                per_layer = dict(zip(self.layers, counts, strict=True))
                raise RuntimeError(
                    f"incomplete capture: forwards seen per layer {per_layer}; a forward "
                    "stopped part-way through the encoder"
                )
            per_layer_rows = [torch.cat(state.rows, dim=0) for state in self._state]
            return torch.stack(per_layer_rows, dim=1)
        finally:
            for state in self._state:
                state.rows = []


def _vision_forward_module(model: nn.Module) -> nn.Module:
    """The module to call with ``pixel_values=``: descend through ``.vision_model`` attributes
    (CLIPModel, wrappers, PeftModel attribute forwarding) down to the vision tower."""
    module = model
    for _ in range(8):  # bounded: a self-referencing attribute must not loop forever
        inner = getattr(module, "vision_model", None)
        if not isinstance(inner, nn.Module) or inner is module:
            break
        module = inner
    return module


def cls_patch_attention(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Renormalised CLS->patch attention of one batch, ``[B, L, H, N]`` float32.

    Runs the vision tower (``.vision_model`` of a CLIPModel or wrapper) on ``pixel_values``
    under ``no_grad`` inside an ``AttentionProbe``, drops the CLS->CLS weight and renormalises
    the patch weights (``renormalize_patches``).
    """
    forward = _vision_forward_module(vision_model)
    with torch.no_grad(), AttentionProbe(forward, layers) as probe:
        forward(pixel_values=pixel_values)
        rows = probe.pop()
    return renormalize_patches(rows)


def full_attention(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:
    """Full attention maps of one batch, ``[B, L, H, T, T]`` float32 (row = query, CLS first).

    Recomputed from the q_proj/k_proj outputs of every query under ``no_grad``; equals the
    eager ``output_attentions`` weights (which SDPA never returns). Memory is
    ``B * L * H * T * T`` floats: batch the images for large towers.
    """
    forward = _vision_forward_module(vision_model)
    with torch.no_grad(), AttentionProbe(forward, layers, full=True) as probe:
        forward(pixel_values=pixel_values)
        return probe.pop()
