"""Seeded, stratified splits and class-balanced subsets, with fingerprints.

The validation split is carved out of the training split; probe images come from validation;
the test split is read once at the end of a run. Nothing here touches pixels.
"""

from __future__ import annotations

import hashlib

import torch


def _perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def stratified_split(labels: torch.Tensor, val_frac: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, val)``: each class contributes ``round(val_frac * n_c)`` (at least one
    when the class has two or more images) to validation. Both sorted."""
    train, val = [], []
    order = _perm(len(labels), seed)
    shuffled = labels[order]
    for c in torch.unique(labels).tolist():
        idx = order[shuffled == c]
        k = round(val_frac * len(idx))
        if k == 0 and len(idx) >= 2:
            k = 1
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``min(n, len(labels))`` indices, as equal across classes as the data allows (round-robin
    over classes in a seeded order, each class's images seeded-shuffled). Sorted."""
    n = min(n, len(labels))
    order = _perm(len(labels), seed)
    shuffled = labels[order]
    pools = [order[shuffled == c].tolist() for c in torch.unique(labels).tolist()]
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for pool in pools:
            if depth < len(pool) and len(picked) < n:
                picked.append(pool[depth])
        depth += 1
    return torch.tensor(sorted(picked), dtype=torch.long)


def probe_subsets(labels: torch.Tensor, n: int, k: int, seed: int) -> list[torch.Tensor]:
    """``k`` fixed class-balanced subsets of ``n`` indices (seeds ``seed .. seed+k-1``): the
    same for every run that shares the validation split."""
    return [balanced_subset(labels, n, seed + j) for j in range(k)]


def index_fingerprint(index: torch.Tensor) -> str:
    """Hash of an index set (16 hex digits): equal fingerprints mean identical splits."""
    return hashlib.sha256(index.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
