"""Names that become directory names: a run's name, a study's run ids.

A run's default directory is ``runs/<name>-<hash>`` and a study's runs live in
``STORE/runs/<run id>``: a ``/``, a ``..`` or a 300-byte name would write outside them or fail
halfway through a study, so names are checked when the config is validated.
"""

from __future__ import annotations

import re

from attndrift.yamlio import shorten

MAX_NAME_BYTES = 200  # run ids add 9 characters; file names stop at 255 bytes
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+,@-]+")
_NOT_IN_NAMES = re.compile(r"[/\\\x00-\x1f\x7f]")


def check_name(name: str) -> None:
    """Raise `ValueError` (one line) unless ``name`` can be one directory name."""
    bad = _NOT_IN_NAMES.search(name)
    size = len(name.encode())
    if not name or name.startswith(".") or bad or size > MAX_NAME_BYTES:
        why = ("is empty" if not name else f"contains {bad.group()!r}" if bad
               else "starts with '.'" if name.startswith(".")
               else f"is {size} bytes long (at most {MAX_NAME_BYTES})")
        raise ValueError(f"name {shorten(name, 40)} {why}; a name is one directory name, "
                         "e.g. lora_r8")


def safe_component(text: str) -> str:
    """``text`` as one path component that cannot leave its directory: every run of characters
    outside ``[A-Za-z0-9_.=+,@-]`` (``/``, ``\\``, spaces, ...) and every ``..`` becomes ``_``,
    and leading dots go (no hidden names). Safe text is returned unchanged."""
    return re.sub(r"\.\.+", "_", _UNSAFE.sub("_", text)).lstrip(".") or "_"
