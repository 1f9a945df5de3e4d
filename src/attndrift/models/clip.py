"""Load a transformers `CLIPModel` with its tokenizer and image statistics.

``"tiny"`` is the CLIP shipped inside the package (pretrained on the built-in shapes world);
anything else is a hub id or a local directory written by ``save_pretrained``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from attndrift import hub
from attndrift.data.base import Preprocessor
from attndrift.models.errors import ExternalModelError

TINY_CLIP_DIR = Path(__file__).resolve().parent / "tiny_clip"
TINY_NAMES = ("tiny", "attndrift/tiny")

# OpenAI CLIP's normalisation, used when a checkpoint ships no preprocessor config.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoadedCLIP:
    model: torch.nn.Module  # transformers CLIPModel
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.image_size, self.mean, self.std)


def resolve_source(name: str) -> str:
    if name in TINY_NAMES:
        if not (TINY_CLIP_DIR / "config.json").is_file():
            raise FileNotFoundError(
                f"the shipped tiny CLIP is missing from {TINY_CLIP_DIR}; rebuild it with "
                f"`attndrift pretrain-tiny --out {TINY_CLIP_DIR}`")
        return str(TINY_CLIP_DIR)
    return name


def looks_local(name: str) -> bool:
    """Whether ``name`` reads as a filesystem path rather than a hub id (``org/model``)."""
    return (Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
            or "\\" in name)


def check_model_name(name: str) -> None:
    """Raise `ValueError` (one line) for a local model path that cannot be a CLIP checkpoint:
    missing, or a directory without ``config.json``. Whether a hub id can be had here is
    `hub_problem`'s question (`attndrift.config.check_downloads`)."""
    if name in TINY_NAMES:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json; give a directory "
                             "written by save_pretrained")
        _check_clip_dir(path)
        return
    if path.exists():
        raise ValueError(f"model {name} is a file; give a directory written by save_pretrained")
    if looks_local(name):
        raise ValueError(f"model directory {name} does not exist; give 'tiny', a hub id such as "
                         "openai/clip-vit-base-patch16, or a directory written by "
                         "save_pretrained")


def _check_clip_dir(path: Path) -> None:
    """Refuse, before anything loads, a model directory whose weight files cannot be read
    safely (`attndrift.models.weights`) or that holds no tensors of one of CLIP's towers (a
    ``CLIPForImageClassification`` save has no text tower: it would be random)."""
    from attndrift.models.weights import check_weight_dir

    names = check_weight_dir(path)
    lacking = [t for t in ("vision_model.", "text_model.")
               if names and not any(n.startswith(t) for n in names)]
    if lacking:
        raise ExternalModelError(
            f"model directory {path} is not a whole CLIP: it has no "
            f"{lacking[0].rstrip('.')} tensors (a vision-only save?); give the pretrained "
            "CLIP, and measure a fine-tune with attndrift measure")


def hub_cached(name: str) -> bool:
    """Whether the Hugging Face cache holds hub id ``name`` (its config.json, at main)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a valid repo id: from_pretrained names the problem
        return False


def _advice(name: str) -> str:
    return (f"download it once with network access (`hf download {name}`, or one run without "
            f"HF_HUB_OFFLINE), point HF_HOME at a cache that holds it (now {hub.hub_cache()}), "
            "or give a local directory written by save_pretrained")


def hub_problem(name: str) -> str | None:
    """One line saying why hub id ``name`` cannot be loaded here, or None if it can: cached,
    or the hub answers. Never waits longer than one `attndrift.hub.probe_timeout` (no
    retries): offline (HF_HUB_OFFLINE=1) it only looks in the cache."""
    if hub_cached(name):
        return None
    if hub.offline():
        return (f"model {name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 "
                f"forbids downloading it: {_advice(name)}")
    found = hub.probe(name)
    if found is None:
        return None
    kind, why = found
    if kind == "missing":
        return (f"model {name!r} does not exist on {hub.endpoint()} (check the id), and no "
                "local directory has that name")
    if kind == "gated":
        return (f"model {name!r} is gated on {hub.endpoint()}: accept its terms there and log "
                "in (`hf auth login`), or give a local directory written by save_pretrained")
    return (f"model {name!r} is not cached and {hub.endpoint()} is unreachable ({why}, one "
            f"try, {hub.probe_timeout():g}s timeout): {_advice(name)}")


def _image_stats(source: str, local_only: bool = False) -> tuple[tuple, tuple]:
    """Mean and std from the checkpoint's own preprocessor config (OpenAI's if absent)."""
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from transformers.utils import cached_file

            found = cached_file(source, "preprocessor_config.json", local_files_only=local_only,
                                _raise_exceptions_for_missing_entries=False)
            path = Path(found) if found else None
        except OSError:
            path = None
    if path is None or not path.is_file():
        return OPENAI_MEAN, OPENAI_STD
    from attndrift.models.weights import read_json_object  # bad JSON: one line

    cfg = read_json_object(path)
    return (tuple(cfg.get("image_mean", OPENAI_MEAN)), tuple(cfg.get("image_std", OPENAI_STD)))


class ModelUnavailable(RuntimeError):
    """A checkpoint that is neither local nor downloadable here."""


def _unavailable(name: str, what: str, err: Exception) -> ModelUnavailable:
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return ModelUnavailable(
        f"{what} of {name!r} is not available ({type(err).__name__}). Download it once with "
        f"network access (hub cache: {cache}; HF_HUB_OFFLINE=1 forbids downloads), or give a "
        f"local directory written by save_pretrained as model=/path/to/dir")


def load_clip(name: str = "tiny", *, attn_implementation: str = "sdpa") -> LoadedCLIP:
    """Load ``name`` (``"tiny"``, a hub id or a local directory) in float32, eval mode."""
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise here
    source = resolve_source(name)
    local_only = False
    if not Path(source).expanduser().is_dir():  # a hub id: fail in seconds, not a minute
        problem = hub_problem(name)
        if problem:
            raise ModelUnavailable(problem)
        # cached, and the hub does not answer: read the cache without transformers' retries
        local_only = hub.offline() or (hub.probe(name) or ("",))[0] == "unreachable"
    if Path(source).expanduser().is_dir():
        _check_clip_dir(Path(source).expanduser())
    try:
        model, info = CLIPModel.from_pretrained(
            source, attn_implementation=attn_implementation, dtype=torch.float32,
            local_files_only=local_only, output_loading_info=True)
    except OSError as err:
        raise _unavailable(name, "the CLIP model", err) from None
    except Exception as err:  # SafetensorError, a pickle, ...: one line, never "unpickle it"
        raise ExternalModelError(f"model {name!r} is not a loadable CLIP checkpoint "
                                 f"({type(err).__name__})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # randomly initialised tensors: nothing is ever scored on them
        raise ExternalModelError(f"model {name!r} lacks {len(missing)} CLIPModel tensors "
                                 f"(e.g. {missing[0]}): not a whole CLIP; give the "
                                 "pretrained CLIP")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise _unavailable(name, "the tokenizer", err) from None
    # Offline, transformers can hand back a near-empty tokenizer without error; never use one.
    vocab = model.config.text_config.vocab_size
    if len(tokenizer) < min(10, vocab):
        raise ModelUnavailable(
            f"the tokenizer of {name!r} has {len(tokenizer)} tokens for a {vocab}-token text "
            "model: it did not load (offline without a cached copy?); give a local directory "
            "holding the tokenizer files")
    mean, std = _image_stats(source, local_only)
    model.eval()
    return LoadedCLIP(model, tokenizer, int(model.config.vision_config.image_size),
                      mean, std, source)
