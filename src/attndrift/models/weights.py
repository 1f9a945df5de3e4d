"""Reading weight files that may be hostile: every failure is one line (`ExternalModelError`).

- safetensors files are opened by the safetensors library, which bounds the header and checks
  that the tensors' byte ranges cover the file exactly: a zero-byte or truncated file, a
  header declaring 2^63 bytes, or another file renamed ``.safetensors`` is refused before a
  tensor is read.
- torch files (``.pt``, ``.pth``, ``.bin``) are read with ``weights_only=True`` only: a pickle
  holding code (a whole module saved with ``torch.save(model)``) is refused, never executed,
  and the message says how to save tensors, never how to unpickle.
- links are followed, to regular files only: a link to a device or a pipe would block a read
  (or a checksum) forever.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from attndrift.fileio import file_sha256
from attndrift.models.errors import ExternalModelError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# transformers' weight files (sharded or not); a Trainer checkpoint's optimizer.pt,
# training_args.bin, ... are not weights and are never read
MODEL_FILE = re.compile(r"(pytorch_)?model(-\d+-of-\d+)?\.(safetensors|bin)")
NOT_WEIGHTS = re.compile(r"(optimizer|scheduler|scaler|resume)\.pt|rng_state.*\.pth|"
                         r"training_args\.bin|attention\.safetensors")
SAVE_ADVICE = "save the model's tensors (save_pretrained, safetensors, or model.state_dict())"


def regular_file(path: Path) -> Path:
    """``path`` if it is (or links to) a non-empty regular file; else `ExternalModelError`."""
    path = Path(path)
    if not path.exists():
        what = "a broken link" if path.is_symlink() else "missing"
        raise ExternalModelError(f"{path}: {what}")
    if not path.is_file():
        raise ExternalModelError(f"{path}: not a regular file (a link to a device, a pipe or a "
                                 "directory?)")
    if path.stat().st_size == 0:
        raise ExternalModelError(f"{path}: an empty (0-byte) file; {SAVE_ADVICE}")
    return path


def _safetensors_error(path: Path, err: Exception) -> ExternalModelError:
    why = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    if path.is_symlink():
        path = f"{path} (a link to {path.resolve()})"
    return ExternalModelError(f"{path}: not a readable safetensors file ({why}); truncated, "
                              f"or not a checkpoint; {SAVE_ADVICE}")


def check_safetensors(path: Path) -> list[str]:
    """The tensor names of safetensors file ``path`` (its header only is read)."""
    from safetensors import safe_open

    path = regular_file(path)
    try:
        with safe_open(path, "pt") as fh:
            return list(fh.keys())
    except Exception as err:  # SafetensorError (not an OSError), OSError, ...
        raise _safetensors_error(path, err) from None


def read_safetensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of safetensors file ``path``."""
    from safetensors.torch import load_file

    path = regular_file(path)
    try:
        return load_file(path, device=device)
    except Exception as err:
        raise _safetensors_error(path, err) from None


def read_torch_file(path: Path, mmap: bool = False) -> Any:
    """A torch file read with ``weights_only=True`` (``mmap``: without reading the tensors)."""
    path = regular_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # pickle of a whole module, corrupt or truncated file, ...
        why = "it pickles more than tensors" if "nsupported global" in str(err) else (
            f"{type(err).__name__}")
        raise ExternalModelError(
            f"{path}: not a loadable state dict ({why}); only tensors are read from torch "
            f"files, never pickled code: {SAVE_ADVICE}"
        ) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a torch file read with
    ``weights_only=True`` (a training checkpoint's ``state_dict``; DDP's ``module.`` prefix
    removed)."""
    state: Any = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExternalModelError(f"{path}: not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; anything else (a list, bad JSON, binary) is one line."""
    path = regular_file(path)
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ExternalModelError(f"{path}: not valid JSON ({str(err)[:120]})") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise ExternalModelError(f"{path}: JSON nested too deeply to be a config") from None
    if not isinstance(value, dict):
        raise ExternalModelError(f"{path}: a JSON {type(value).__name__}, not an object")
    return value


def check_weight_dir(path: Path) -> set[str]:
    """The tensor names in a ``save_pretrained`` directory's weight files, each file checked
    first: every ``*.safetensors`` header, every ``*.bin`` opened ``weights_only``
    (memory-mapped: the tensors are not read). Refuses a file that cannot be read safely."""
    path = Path(path)
    names: set[str] = set()
    for file in sorted(p for p in path.iterdir() if MODEL_FILE.fullmatch(p.name)):
        if file.suffix == ".safetensors":
            names.update(check_safetensors(file))
        else:
            state = read_torch_file(file, mmap=True)
            names.update(state if isinstance(state, dict) else ())
    if (path / "model.safetensors.index.json").exists():
        read_json_object(path / "model.safetensors.index.json")
    return names


def checkpoint_sha256(source: str) -> str | None:
    """16 hex of the checkpoint's weights: a file's bytes; for a directory, its weight files
    (names and bytes, sorted); for a hub id, the cached ``model.safetensors`` if any."""
    path = Path(source)
    if path.is_file():
        return file_sha256(path, 16)
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not NOT_WEIGHTS.fullmatch(p.name)
        )
        if not files:
            return None
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}:{file_sha256(p)}\n".encode())
        return h.hexdigest()[:16]
    if path.exists():  # a device or a pipe: never read
        return None
    try:
        from transformers.utils import cached_file

        found = cached_file(
            source, "model.safetensors", _raise_exceptions_for_missing_entries=False
        )
    except OSError:
        return None
    return file_sha256(Path(found), 16) if found else None
