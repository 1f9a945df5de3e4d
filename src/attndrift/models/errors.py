"""Errors of loading a foreign checkpoint, shared by `external` and its format converters
(`open_clip`), which import them from here so neither imports the other at module level."""

from __future__ import annotations


class ExternalModelError(ValueError):
    """FINETUNED cannot be measured: unknown format or unreadable checkpoint (one line)."""


class ArchitectureMismatch(ExternalModelError):
    """The checkpoint's architecture is not the reference's."""
