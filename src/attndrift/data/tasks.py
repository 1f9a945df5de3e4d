"""The registry of built-in datasets: name -> `TaskEntry`. A leaf module (it imports no
dataset), so that the datasets register themselves here on import and
`attndrift.data.registry` imports them, without an import circle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from attndrift.data.base import ImageTask

Loader = Callable[[str, int], ImageTask]


@dataclass(frozen=True)
class TaskEntry:
    name: str
    kind: Literal["classification", "zeroshot"]
    description: str
    loader: Loader


_REGISTRY: dict[str, TaskEntry] = {}


def register_task(name: str, *, kind: Literal["classification", "zeroshot"],
                  description: str) -> Callable[[Loader], Loader]:
    def wrap(loader: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} registered twice")
        _REGISTRY[name] = TaskEntry(name, kind, description, loader)
        return loader

    return wrap
