"""Seeded, stratified splits and class-balanced subsets, with fingerprints.

The validation split is carved out of the training split; probe images come from validation,
or, with per-class budgets, from a probe split disjoint from it; the test split is read once
at the end of a run. Nothing here touches pixels.
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


def budget_split(labels: torch.Tensor, train: int, val: int, probe: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices ``(train, val, probe)``, pairwise disjoint, with exactly ``train``, ``val`` and
    ``probe`` images of every class (the later protocol's per-class budgets: EuroSAT 160 / 30
    / 20, Pets 40 / 10 / 6). Each class's images are shuffled (seeded) and dealt out in that
    order: probe first, then validation, then training, so the probe and validation sets do
    not change when only the training budget does. Each sorted. A class with fewer than
    ``train + val + probe`` images is an error."""
    need = train + val + probe
    parts: tuple[list[torch.Tensor], ...] = ([], [], [])
    order = _perm(len(labels), seed)
    shuffled = labels[order]
    for c in torch.unique(labels).tolist():
        idx = order[shuffled == c]
        if len(idx) < need:
            raise ValueError(f"class {c} has {len(idx)} training images, the budget needs {need} "
                             f"({train} train + {val} val + {probe} probe); lower data.budget")
        parts[2].append(idx[:probe])
        parts[1].append(idx[probe : probe + val])
        parts[0].append(idx[probe + val : need])
    train_idx, val_idx, probe_idx = (torch.cat(p).sort().values for p in parts)
    return train_idx, val_idx, probe_idx


def run_split(labels: torch.Tensor, val_frac: float, seed: int,
              budget: tuple[int, int, int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train, val, probe_pool)`` of a run's training split: `budget_split` with a budget
    ``(train, val, probe)``; otherwise `stratified_split` with the validation split as the
    probe pool (the papers' protocol: probe images come from validation)."""
    if budget is not None:
        return budget_split(labels, *budget, seed)
    train_idx, val_idx = stratified_split(labels, val_frac, seed)
    return train_idx, val_idx, val_idx


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
