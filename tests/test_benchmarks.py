"""The benchmark's metric comparison is like for like: attndrift's ``summarize`` and the naive
per-batch reference in benchmarks/run.py compute the same table. (How much faster the library is
is the benchmark's business, not a timed test's.)"""

from pathlib import Path

from attndrift.probes.metrics import summarize

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_naive_reference_matches_summarize(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run as benchmark

    # 40 images with the real layer/head/patch shape: batches of 32 leave a ragged last batch
    # for the naive.
    x = benchmark.random_probe((40, 12, 12, 49), seed=3)
    fast, naive = summarize(x), benchmark.naive_summarize(x)
    assert len(benchmark.pieces._flatten(fast)) == 3 * (12 + 12 * 12) + 12 + 4
    assert benchmark.max_abs_diff(fast, naive) <= 1e-6
    assert benchmark.max_abs_diff is benchmark.pieces.max_abs_diff


def test_projection_counts_checkpoints_as_train_py_writes_them(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import pieces as benchmark

    assert benchmark.checkpoints(10, 60.0, 0.0) == 9  # every epoch end but the last
    assert benchmark.checkpoints(10, 60.0, 10.0) == 0  # a 10-minute run never waits 10 minutes
    assert benchmark.checkpoints(10, 240.0, 10.0) == 3  # epoch ends at 12, 24, 36 minutes
    assert benchmark.checkpoints(1, 1e9, 0.0) == 0
