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


def test_budget_split_is_disjoint_class_balanced_and_seeded():
    from attndrift.data.splits import budget_split

    labels = torch.arange(6).repeat_interleave(torch.tensor([40, 35, 30, 50, 31, 45]))
    train, val, probe = budget_split(labels, 16, 8, 6, seed=3)
    parts = [set(p.tolist()) for p in (train, val, probe)]
    assert all(a.isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    for idx, k in ((train, 16), (val, 8), (probe, 6)):
        assert torch.bincount(labels[idx], minlength=6).tolist() == [k] * 6
        assert torch.equal(idx, idx.sort().values)
    again = budget_split(labels, 16, 8, 6, seed=3)
    other = budget_split(labels, 16, 8, 6, seed=4)
    fp = [[index_fingerprint(p) for p in s] for s in ((train, val, probe), again, other)]
    assert fp[0] == fp[1] and all(a != b for a, b in zip(fp[0], fp[2], strict=True))
    # a smaller training budget leaves validation and probe where they were
    _, val2, probe2 = budget_split(labels, 4, 8, 6, seed=3)
    assert torch.equal(val2, val) and torch.equal(probe2, probe)


def test_budget_larger_than_a_class_is_refused():
    import pytest

    from attndrift.data.splits import budget_split

    labels = torch.tensor([0] * 30 + [1] * 12)
    with pytest.raises(ValueError, match="class 1 has 12 training images, the budget needs 13"):
        budget_split(labels, 5, 4, 4, seed=0)


def test_run_split_without_budget_probes_validation():
    from attndrift.data.splits import run_split

    labels = torch.arange(4).repeat(25)
    train, val, pool = run_split(labels, 0.2, 7)
    assert torch.equal(pool, val)
    assert [torch.equal(a, b) for a, b in zip((train, val), stratified_split(labels, 0.2, 7),
                                              strict=True)] == [True, True]
