"""The built-in ``shapes`` world: procedurally generated 32x32 images with captions.

Nothing can be downloaded on the machines this package is developed on, so the package carries
its own small visual world, rich enough that a tiny CLIP pretrained on it has real zero-shot
ability that fine-tuning can destroy. Every image shows one object on a textured grey
background; the object has five independent attributes:

========== ===================================================================================
shape      circle, square, triangle, cross, diamond, ring, star, heart
colour     red, green, blue, yellow, purple, orange (saturated; backgrounds are achromatic)
size       small, large
position   top left, top right, center, bottom left, bottom right
background plain, striped, dotted, checkered, noisy (grey levels, period and phase jittered)
========== ===================================================================================

Each image also gets continuous jitter (object centre, radius, rotation, colour, background
grey levels, texture period/phase/orientation, per-pixel noise), so no two images are equal.

Captions name random subsets of the attributes in varied phrasings ("a large red circle at the
top left on a striped background", "a photo of a green star.", "a small shape at the center"),
so the text tower sees every attribute word on its own and in context.

Registered tasks (class names are words a text tower can match):

- ``shapes-layout`` (classification, 10 classes = size x position, "large shape at the top
  left"): the EuroSAT stand-in. It needs no shape identity, so fine-tuning on it lets the
  model forget shapes. train 2,000 / test 500.
- ``shapes-objects`` (classification, 48 classes = colour x shape, "red circle"): the
  fine-grained Oxford-IIIT Pets stand-in. train 3,600 / test 720.
- ``shapes-zs-shape`` (zero-shot, 8 shape names): the held-out transfer task (CIFAR-100
  stand-in). test 1,000.
- ``shapes-zs-colour`` (zero-shot, 6 colour names, prompts "a photo of a red shape."):
  the second transfer task. test 1,020.

Every task is class-balanced (exactly equal counts). Splits are independent draws whose
random seed is derived from ``(task name, split, seed)`` with SHA-256, so a split is the same
whatever else was loaded before it, and train and test never share an image. ``seed=0`` is
the canonical draw used by the study; pass another ``seed`` only to get a different draw of
the same task (e.g. to check that a result does not hinge on one sample of images). Rendered
splits are cached per process (`clear_cache` empties it); every load returns fresh copies.

Rendering is vectorised with torch (2x supersampled object masks for anti-aliasing, one
array expression per shape kind and per texture kind): 5,000 images take ~0.6-0.9 s.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import re
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from attndrift.data.base import ImageTask
from attndrift.data.tasks import register_task

IMAGE_SIZE = 32

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring", "star", "heart")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "center", "bottom left", "bottom right")
BACKGROUNDS = ("plain", "striped", "dotted", "checkered", "noisy")

# Nominal RGB of each colour; every image jitters it (see `_render`).
_PALETTE = torch.tensor([
    (220, 40, 40),    # red
    (40, 185, 60),    # green
    (45, 90, 235),    # blue
    (240, 220, 40),   # yellow
    (160, 60, 210),   # purple
    (250, 140, 25),   # orange
])

# Object centres (x, y) in pixels for each position; jittered by up to +-2 px.
_CENTRES = torch.tensor([(9.0, 9.0), (23.0, 9.0), (16.0, 16.0), (9.0, 23.0), (23.0, 23.0)])
# Object "radius" ranges in pixels (half the extent of the shape's bounding box).
_RADII = torch.tensor([(4.5, 5.5), (7.5, 9.0)])
# Background grey level and texture contrast ranges (0..255). Dark, low-contrast textures keep
# the object brighter than its surroundings whatever its hue: with brighter backgrounds and
# stronger textures (base 25-100, contrast 30-60) the tiny CLIP learned colour at once but sat
# at chance on shape for 1,500 steps; with these it reaches ~90%.
_BG_BASE = (15.0, 60.0)
_BG_CONTRAST = (10.0, 30.0)
_WINDOW = 24  # side of the square window the object is drawn in (pixels)

# Prompt templates of the tasks. The colour task wraps its names in "... shape" so that a
# bare colour word still reads as an object description.
TEMPLATES = ["a {}.", "a photo of a {}.", "an image of a {}.", "a picture of a {}."]
COLOUR_TEMPLATES = ["a {} shape.", "a photo of a {} shape.", "an image of a {} shape.",
                    "a picture of a {} shape."]

# Caption phrasings: a prefix (matching the prompt templates' wording) + a noun phrase naming a
# subset of the attributes + an optional full stop. The "{size} shape at the {pos}" and
# "{colour} shape" phrases are what the layout and colour tasks' prompts look like.
_PREFIXES = ("a ", "a photo of a ", "an image of a ", "a picture of a ")
_PHRASES = (
    "{size} {colour} {shape} at the {pos} on a {bg} background",
    "{colour} {shape} at the {pos} on a {bg} background",
    "{size} {colour} {shape} at the {pos}",
    "{size} {colour} {shape}",
    "{colour} {shape}",
    "{colour} {shape}",
    "{shape}",
    "{shape}",
    "{colour} {shape} on a {bg} background",
    "{size} {shape} at the {pos}",
    "{colour} {shape} at the {pos}",
    "{size} {shape}",
    "{shape} on a {bg} background",
    "{shape} at the {pos}",
    "{size} shape at the {pos}",
    "{size} shape at the {pos}",
    "{colour} shape",
    "{colour} shape",
    "{bg} background with a {colour} {shape}",
    "{bg} background with a {size} shape at the {pos}",
)
_SUFFIXES = ("", ".")

# The same split into words as the tokenizer's pre-tokenizer (tokenizers' `Whitespace`):
# runs of word characters, and runs of punctuation.
_WORD_RE = re.compile(r"\w+|[^\w\s]+")


def words_of(text: str) -> list[str]:
    """The lower-cased words (and punctuation tokens) of ``text``, as the tokenizer sees them."""
    return _WORD_RE.findall(text.lower())


def layout_class_names() -> list[str]:
    """The 10 ``shapes-layout`` classes, label = position * 2 + size."""
    return [f"{s} shape at the {p}" for p in POSITIONS for s in SIZES]


def object_class_names() -> list[str]:
    """The 48 ``shapes-objects`` classes, label = colour * len(SHAPES) + shape."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def vocabulary() -> list[str]:
    """Every word of every caption phrasing, attribute, class name and template (sorted).

    The tiny CLIP's word-level tokenizer is built from this list, so no caption or prompt of
    the world ever maps to the unknown token.
    """
    texts: list[str] = [*SHAPES, *COLOURS, *SIZES, *POSITIONS, *BACKGROUNDS]
    texts += [*_PREFIXES, *_SUFFIXES]
    texts += [re.sub(r"\{\w*\}", " ", p) for p in (*_PHRASES, *TEMPLATES, *COLOUR_TEMPLATES)]
    texts += layout_class_names() + object_class_names()
    return sorted({w for t in texts for w in words_of(t)})


# ----------------------------------------------------------------------------------------------
# Rendering (torch: its elementwise kernels are several times faster than numpy's here, and a
# seeded `torch.Generator` makes every draw reproducible)


def _shape_mask(kind: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-mask of shape ``kind`` in normalised coordinates (unit "radius", v points down)."""
    name = SHAPES[kind]
    au, av = (u.abs(), v.abs()) if name in ("square", "triangle", "cross", "diamond") else (u, v)
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return torch.maximum(au, av) <= 0.82
    if name == "triangle":  # apex up, flat base
        return (v <= 0.75) & (au <= 0.58 * (v + 0.95))
    if name == "cross":  # a plus sign
        return (torch.minimum(au, av) <= 0.3) & (torch.maximum(au, av) <= 0.95)
    if name == "diamond":
        return au + av <= 1.0
    if name == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.5**2)
    if name == "star":  # five points, one pointing up
        rho = torch.sqrt(u * u + v * v)
        lobe = (1.0 + torch.cos(5.0 * (torch.atan2(v, u) + math.pi / 2.0))) / 2.0
        return rho <= 0.42 + 0.6 * lobe**1.5
    if name == "heart":  # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y pointing up
        x, y = 1.15 * u, -1.15 * v + 0.1
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise ValueError(f"unknown shape index {kind}")


def _uniform(lo: float, hi: float, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=g)


def _background(kind: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Grey-level backgrounds ``[N, 32, 32]`` (float, 0..255) of the given texture kinds."""
    n, s = kind.shape[0], IMAGE_SIZE
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32),
                            torch.arange(s, dtype=torch.float32), indexing="ij")
    # Every random number is drawn for every image (not per texture subset), so an image's
    # jitter depends only on its position in the draw.
    base = _uniform(*_BG_BASE, (n,), g)
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2.0 - 1.0
    contrast = _uniform(*_BG_CONTRAST, (n,), g) * sign
    period = _uniform(4.0, 7.0, (n,), g)
    phase = torch.rand((n, 2), generator=g)
    orient = torch.randint(0, 3, (n,), generator=g)
    blocks = torch.rand((n, 8, 8), generator=g)

    pattern = torch.zeros((n, s, s))
    p = period[:, None, None]
    ox, oy = phase[:, 0, None, None] * p, phase[:, 1, None, None] * p

    i = (kind == BACKGROUNDS.index("striped")).nonzero().flatten()
    if i.numel():  # horizontal, vertical or diagonal stripes, half a period wide
        o = orient[i, None, None]
        coord = torch.where(o == 0, yy, torch.where(o == 1, xx, (xx + yy) / math.sqrt(2.0)))
        pattern[i] = (torch.remainder(coord + oy[i], p[i]) < p[i] / 2.0).float()
    i = (kind == BACKGROUNDS.index("dotted")).nonzero().flatten()
    if i.numel():  # a lattice of round dots
        dx = torch.remainder(xx + ox[i], p[i]) - p[i] / 2.0
        dy = torch.remainder(yy + oy[i], p[i]) - p[i] / 2.0
        pattern[i] = (dx * dx + dy * dy <= 1.3**2).float()
    i = (kind == BACKGROUNDS.index("checkered")).nonzero().flatten()
    if i.numel():
        cell = (torch.floor((xx + ox[i]) / (p[i] * 0.6))
                + torch.floor((yy + oy[i]) / (p[i] * 0.6)))
        pattern[i] = torch.remainder(cell, 2.0)
    i = (kind == BACKGROUNDS.index("noisy")).nonzero().flatten()
    if i.numel():  # blocky value noise: 8x8 random levels, each 4x4 pixels
        pattern[i] = blocks[i].repeat_interleave(4, 1).repeat_interleave(4, 2)
    return base[:, None, None] + contrast[:, None, None] * pattern


def _render(attrs: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """uint8 images ``[N, 3, 32, 32]`` of the given attribute indices."""
    shape = attrs["shape"]
    n, s, ss = shape.shape[0], IMAGE_SIZE, 2  # ss: supersampling factor for smooth edges
    bg = _background(attrs["background"], g)

    centre = _CENTRES[attrs["position"]] + _uniform(-2.0, 2.0, (n, 2), g)
    lo, hi = _RADII[attrs["size"]].unbind(1)
    radius = lo + (hi - lo) * torch.rand((n,), generator=g)
    # Small rotations only: a square turned by 45 degrees would be a diamond.
    angle = torch.deg2rad(_uniform(-12.0, 12.0, (n,), g))
    rgb = (_PALETTE[attrs["colour"]] + 12.0 * torch.randn((n, 3), generator=g)).clamp(0, 255)
    noise = 4.0 * torch.randn((n, 3, s, s), generator=g)  # sensor noise

    # The mask is evaluated only in a _WINDOW x _WINDOW pixel window around each object (the
    # largest object, a rotated large square, spans < 22 px), at ss x ss samples per pixel,
    # then box-filtered down and pasted into a padded canvas: 4x less work than the full image.
    corner = centre.floor().long() - _WINDOW // 2  # window's top-left pixel (x, y)
    local = (torch.arange(_WINDOW * ss, dtype=torch.float32) + 0.5) / ss
    win = torch.zeros((n, _WINDOW, _WINDOW))
    for kind in range(len(SHAPES)):
        i = (shape == kind).nonzero().flatten()
        if not i.numel():
            continue
        inv_r = (1.0 / radius[i])[:, None]
        px = (corner[i, 0, None].float() + local - centre[i, 0, None]) * inv_r  # [k, W*ss]
        py = (corner[i, 1, None].float() + local - centre[i, 1, None]) * inv_r
        cos, sin = torch.cos(angle[i])[:, None, None], torch.sin(angle[i])[:, None, None]
        dx, dy = px[:, None, :], py[:, :, None]
        u, v = cos * dx + sin * dy, cos * dy - sin * dx
        mask = _shape_mask(kind, u, v).float()
        win[i] = F.avg_pool2d(mask[:, None], ss).squeeze(1)
    pad = _WINDOW
    canvas = torch.zeros((n, s + 2 * pad, s + 2 * pad))
    ar = torch.arange(_WINDOW)
    rows = (corner[:, 1, None, None] + pad + ar[None, :, None]).expand(n, _WINDOW, _WINDOW)
    cols = (corner[:, 0, None, None] + pad + ar[None, None, :]).expand(n, _WINDOW, _WINDOW)
    canvas[torch.arange(n)[:, None, None], rows, cols] = win
    a = canvas[:, None, pad : pad + s, pad : pad + s]
    img = bg[:, None] * (1.0 - a) + rgb[:, :, None, None] * a + noise
    return img.round_().clamp_(0, 255).to(torch.uint8)


def _seed_of(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.sha256("/".join(map(str, ("attndrift-shapes", *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _attributes(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Uniformly random attribute indices for ``n`` images."""
    # Fixed key order (the draw order), independent of the ATTRIBUTES table below.
    return {key: torch.randint(0, len(values), (n,), generator=g)
            for key, values in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES),
                                ("position", POSITIONS), ("background", BACKGROUNDS))}


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block (the previous setting is restored).

    Rendering is a few hundred small elementwise ops. One thread is only ~30% slower than two
    on an idle 2-core machine, but on a busy one every op of a 2-thread pool waits for a
    descheduled worker: 300 images took 1.2 s with 2 threads and 0.04 s with 1 (measured).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _render_chunked(attrs: dict[str, torch.Tensor], g: torch.Generator,
                    chunk: int = 4096) -> torch.Tensor:
    """Render in chunks so the supersampled masks of a large corpus never fill memory."""
    n = attrs["shape"].shape[0]
    out = torch.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    with _one_thread():
        for start in range(0, n, chunk):
            out[start : start + chunk] = _render({k: v[start : start + chunk]
                                                  for k, v in attrs.items()}, g)
    return out


def _captions(attrs: dict[str, torch.Tensor], g: torch.Generator) -> list[str]:
    n = attrs["shape"].shape[0]
    prefix = torch.randint(0, len(_PREFIXES), (n,), generator=g).tolist()
    phrase = torch.randint(0, len(_PHRASES), (n,), generator=g).tolist()
    suffix = torch.randint(0, len(_SUFFIXES), (n,), generator=g).tolist()
    a = {k: v.tolist() for k, v in attrs.items()}
    return [
        _PREFIXES[prefix[k]]
        + _PHRASES[phrase[k]].format(
            size=SIZES[a["size"][k]], colour=COLOURS[a["colour"][k]],
            shape=SHAPES[a["shape"][k]], pos=POSITIONS[a["position"][k]],
            bg=BACKGROUNDS[a["background"][k]])
        + _SUFFIXES[suffix[k]]
        for k in range(n)
    ]


ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS,
              "background": BACKGROUNDS}


def pretrain_corpus(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` image-caption pairs for contrastive pretraining: uint8 ``[n, 3, 32, 32]``, captions.

    All attributes are uniform and independent. The seed space is separate from the tasks'
    (both are hashed with different names), so a corpus never reproduces a task image.
    """
    images, captions, _ = annotated_corpus(n, seed)
    return images, captions


def annotated_corpus(n: int, seed: int) -> tuple[torch.Tensor, list[str],
                                                 dict[str, torch.Tensor]]:
    """`pretrain_corpus` plus each image's attribute indices (keys of `ATTRIBUTES`)."""
    g = torch.Generator().manual_seed(_seed_of("pretrain-corpus", seed))
    attrs = _attributes(n, g)
    captions = _captions(attrs, g)
    return _render_chunked(attrs, g), captions, attrs


def caption_attributes(captions: Sequence[str]) -> dict[str, torch.Tensor]:
    """Which value of each attribute every caption mentions: index, or -1 if not mentioned.

    Attribute values are distinct words (or word pairs, for positions), so this is a lookup.
    Pretraining uses it to know which captions in a batch are *true* of which images ("a
    circle" is true of every circle, not only of the image it was written for).
    """
    out = {}
    padded = [f" {' '.join(words_of(c))} " for c in captions]
    for key, values in ATTRIBUTES.items():
        idx = torch.full((len(captions),), -1, dtype=torch.long)
        for v, value in enumerate(values):
            hit = [f" {value} " in c for c in padded]
            idx[torch.tensor(hit, dtype=torch.bool)] = v
        out[key] = idx
    return out


# ----------------------------------------------------------------------------------------------
# Tasks


def _balanced(n_classes: int, per_class: int, g: torch.Generator) -> torch.Tensor:
    """Exactly ``per_class`` labels of each class (int64), in random order."""
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return labels[torch.randperm(labels.numel(), generator=g)]


def _make_task(name: str, split: str, seed: int, splits: dict[str, int], class_names: list[str],
               templates: list[str],
               assign: Callable[[dict[str, torch.Tensor], torch.Tensor], None]) -> ImageTask:
    if split not in splits:
        raise ValueError(f"{name} has no split {split!r}; available splits: {sorted(splits)}")
    images, labels = _render_task(name, split, seed, splits[split], len(class_names), assign)
    # Copies, so a caller that edits its tensors in place cannot corrupt the cache.
    return ImageTask(name, images.clone(), labels.clone(), list(class_names), list(templates))


@functools.lru_cache(maxsize=16)
def _render_task(name: str, split: str, seed: int, per_class: int, n_classes: int,
                 assign: Callable[[dict[str, torch.Tensor], torch.Tensor], None],
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached: a process (a test session, a study worker) loads the same splits many times and
    # rendering is deterministic; all tasks together hold ~35 MB.
    g = torch.Generator().manual_seed(_seed_of(name, split, seed))
    labels = _balanced(n_classes, per_class, g)
    attrs = _attributes(labels.numel(), g)
    assign(attrs, labels)  # overwrite the attributes the label determines
    return _render_chunked(attrs, g), labels


def clear_cache() -> None:
    """Forget the rendered task splits (the next load renders them again)."""
    _render_task.cache_clear()


def _set_layout(attrs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    attrs["position"], attrs["size"] = labels // len(SIZES), labels % len(SIZES)


def _set_object(attrs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    attrs["colour"], attrs["shape"] = labels // len(SHAPES), labels % len(SHAPES)


def _set_shape(attrs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    attrs["shape"] = labels


def _set_colour(attrs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    attrs["colour"] = labels


# Images per class of each split.
LAYOUT_SPLITS = {"train": 200, "test": 50}  # 10 classes: 2,000 / 500
OBJECT_SPLITS = {"train": 75, "test": 15}  # 48 classes: 3,600 / 720
ZS_SHAPE_SPLITS = {"test": 125}  # 8 classes: 1,000
ZS_COLOUR_SPLITS = {"test": 170}  # 6 classes: 1,020


@register_task("shapes-layout", kind="classification",
               description="shapes world: object size x position, 10 classes (EuroSAT stand-in; "
                           "needs no shape identity)")
def load_layout(split: str, seed: int = 0) -> ImageTask:
    return _make_task("shapes-layout", split, seed, LAYOUT_SPLITS, layout_class_names(),
                      TEMPLATES, _set_layout)


@register_task("shapes-objects", kind="classification",
               description="shapes world: colour x shape, 48 fine-grained classes "
                           "(Oxford-IIIT Pets stand-in)")
def load_objects(split: str, seed: int = 0) -> ImageTask:
    return _make_task("shapes-objects", split, seed, OBJECT_SPLITS, object_class_names(),
                      TEMPLATES, _set_object)


@register_task("shapes-zs-shape", kind="zeroshot",
               description="shapes world: zero-shot shape names, 8 classes (CIFAR-100 stand-in)")
def load_zs_shape(split: str, seed: int = 0) -> ImageTask:
    return _make_task("shapes-zs-shape", split, seed, ZS_SHAPE_SPLITS, list(SHAPES),
                      TEMPLATES, _set_shape)


@register_task("shapes-zs-colour", kind="zeroshot",
               description="shapes world: zero-shot colour names, 6 classes")
def load_zs_colour(split: str, seed: int = 0) -> ImageTask:
    return _make_task("shapes-zs-colour", split, seed, ZS_COLOUR_SPLITS, list(COLOURS),
                      COLOUR_TEMPLATES, _set_colour)

