"""Datasets as uint8 image tensors with labels, class names and prompt templates."""

from attndrift.data.base import ImageTask, Preprocessor
from attndrift.data.registry import available_tasks, load_task

__all__ = ["ImageTask", "Preprocessor", "available_tasks", "load_task"]
