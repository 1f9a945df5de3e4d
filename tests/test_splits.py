"""Splits: stratified, disjoint, seeded; probe subsets class-balanced."""

import torch

from attndrift.data.splits import balanced_subset, index_fingerprint, stratified_split


def test_stratified_split_is_disjoint_complete_and_stratified():
    sizes = [50, 40, 30, 20, 10, 50, 40, 30, 20, 10]
    labels = torch.arange(10).repeat_interleave(torch.tensor(sizes))
    train, val = stratified_split(labels, 0.2, seed=42)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    for c, n in enumerate(sizes):
        assert int((labels[val] == c).sum()) == round(0.2 * n)


def test_split_depends_only_on_seed():
    labels = torch.arange(5).repeat(40)
    a = stratified_split(labels, 0.2, seed=1)
    b = stratified_split(labels, 0.2, seed=1)
    c = stratified_split(labels, 0.2, seed=2)
    assert index_fingerprint(a[1]) == index_fingerprint(b[1])
    assert index_fingerprint(a[1]) != index_fingerprint(c[1])


def test_balanced_subset():
    labels = torch.arange(7).repeat(30)
    idx = balanced_subset(labels, 70, seed=42)
    assert len(idx) == 70 and len(set(idx.tolist())) == 70
    assert torch.bincount(labels[idx]).tolist() == [10] * 7
    # uneven: 20 over 7 classes -> counts differ by at most one
    counts = torch.bincount(labels[balanced_subset(labels, 20, seed=0)], minlength=7)
    assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == 20
    # a scarce class contributes all it has; the rest fills from the others
    skewed = torch.tensor([0] * 3 + [1] * 50)
    sub = balanced_subset(skewed, 20, seed=0)
    assert torch.bincount(skewed[sub]).tolist() == [3, 17]
    assert len(balanced_subset(labels, 10_000, seed=0)) == len(labels)
