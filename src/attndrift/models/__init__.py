"""CLIP loading, the study's classifier, and adaptation methods."""

from attndrift.models.clip import TINY_CLIP_DIR, LoadedCLIP, load_clip

__all__ = ["TINY_CLIP_DIR", "LoadedCLIP", "load_clip"]
