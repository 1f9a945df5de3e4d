"""Tests for attndrift.probes.metrics: closed forms, a float64 loop reference, dtypes, shapes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from attndrift.probes import METRICS as REEXPORTED_METRICS
from attndrift.probes.metrics import (
    METRICS,
    MetricInfo,
    attention_distance,
    delta_pct,
    entropy,
    erf,
    gini,
    head_diversity,
    query_attention_distance,
    renormalize_patches,
    summarize,
)

# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 20, 49, 196])
def test_uniform_closed_forms(n: int) -> None:
    p = torch.full((n,), 1.0 / n, dtype=torch.float64)
    assert entropy(p).item() == pytest.approx(math.log(n), abs=1e-12)
    # The k largest of a uniform row hold k/n of the mass: ceil(0.95 n) patches are needed.
    assert erf(p).item() == pytest.approx(math.ceil(0.95 * n) / n, abs=1e-12)
    assert gini(p).item() == pytest.approx(0.0, abs=1e-12)


def test_uniform_erf_float32_boundary() -> None:
    # n = 20: 19 uniform weights are exactly 0.95 of the mass; float32 round-off must not
    # turn that into 20.
    p = torch.full((20,), 1.0 / 20)
    assert erf(p).item() == pytest.approx(19 / 20)


@pytest.mark.parametrize("n", [2, 9, 49])
def test_one_hot_closed_forms(n: int) -> None:
    p = torch.zeros(n)
    p[n // 2] = 1.0
    assert entropy(p).item() == 0.0
    assert erf(p).item() == pytest.approx(1.0 / n)
    assert gini(p).item() == pytest.approx((n - 1) / n, abs=1e-6)


@pytest.mark.parametrize("a", [0.5, 0.7, 0.9, 0.94, 0.95, 0.99])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_point_closed_forms(a: float, dtype: torch.dtype) -> None:
    n = 10
    p = torch.zeros(n, dtype=dtype)
    p[3] = a
    p[7] = 1.0 - a
    assert entropy(p).item() == pytest.approx(-(a * math.log(a) + (1 - a) * math.log(1 - a)))
    # the row as represented (float32 0.95 holds 0.94999999869 of its row's mass: 2 patches)
    hi, lo_ = float(p[3]), float(p[7])
    expected_erf = 1 / n if max(hi, lo_) >= 0.95 * (hi + lo_) else 2 / n
    assert erf(p).item() == pytest.approx(expected_erf)
    if dtype == torch.float64:
        assert expected_erf == (1 / n if a >= 0.95 else 2 / n)
    # By hand: sorted ascending, the 8 zeros take ranks 1..8, then min(a, 1-a) has rank 9 and
    # max(a, 1-a) rank 10; total mass is 1.
    lo, hi = min(a, 1 - a), max(a, 1 - a)
    expected_gini = 2 * (9 * lo + 10 * hi) / (n * 1.0) - (n + 1) / n
    assert gini(p).item() == pytest.approx(expected_gini, abs=1e-6)


def _boundary_row(top12: float) -> list[float]:
    """20 integer-valued weights (exact in float32, exact sums in float64) totalling 10^7 whose
    12 largest hold ``top12``: eleven of 800,000, one of ``top12 - 8.8e6``, eight equal ones
    (multiples of 0.5) holding the rest. 0.95 * 10^7 is 9,500,000.0 in float64 too."""
    return [800_000.0] * 11 + [top12 - 8_800_000.0] + [(1e7 - top12) / 8] * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("top12", "k"), [(9_499_996.0, 13), (9_500_000.0, 12),
                                          (9_500_004.0, 12)])
def test_erf_at_the_095_boundary_is_exact(top12: float, k: int, dtype: torch.dtype) -> None:
    """000 eq. 2: the smallest k whose k largest weights hold >= 0.95 of the mass. A row whose
    12 largest hold 0.9499996 needs 13 (a relative tolerance of 1e-6 counted it as 12); one
    at exactly 0.95 or just above needs 12 (issue 24 item 17)."""
    row = _boundary_row(top12)
    assert math.fsum(sorted(row, reverse=True)[:12]) == top12  # the row is what it claims
    assert sorted(row, reverse=True)[11] > sorted(row, reverse=True)[12]  # no tie at the cut
    p = torch.tensor(row, dtype=dtype)
    want = torch.tensor(k / 20, dtype=dtype).item()  # k / 20 in the input's dtype
    assert erf(p).item() == want
    padded = torch.cat([p, torch.zeros(5, dtype=dtype)])  # 25 patches, a square grid
    assert summarize(padded.reshape(1, 1, 1, 25))["erf"]["layers"] == [
        torch.tensor(k / 25, dtype=dtype).item()]
    if top12 != 9_500_000.0:  # normalised (as attention is), 4e-7 from the target is still
        assert erf(p / p.sum()).item() == want  # unambiguous; exactly at it is not


def test_erf_mass_argument_and_unnormalised_rows() -> None:
    # integer weights: exact in float32, exact sums (5, 8, 10) and targets (5.0, 8.0, 8.1 x 10)
    p = torch.tensor([5.0, 3.0, 2.0, 0.0])
    assert erf(p, mass=0.5).item() == pytest.approx(1 / 4)
    assert erf(p, mass=0.8).item() == pytest.approx(2 / 4)
    assert erf(p, mass=0.81).item() == pytest.approx(3 / 4)
    # Mass is relative to the row's total (p / 16: dyadic, so still exact).
    assert erf(p / 16, mass=0.8).item() == pytest.approx(2 / 4)
    # the float32 row [0.5, 0.3, 0.2] holds 0.5 / 1.0000000149 < 0.5 in its largest weight
    assert erf(torch.tensor([0.5, 0.3, 0.2]), mass=0.5).item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        erf(p, mass=0.0)


def test_head_diversity_closed_forms() -> None:
    identical = torch.softmax(torch.randn(1, 12), dim=-1).expand(5, 12)
    assert head_diversity(identical).item() == pytest.approx(0.0, abs=1e-6)
    orthogonal = torch.eye(4, 9)  # 4 one-hot heads on different patches
    assert head_diversity(orthogonal).item() == pytest.approx(1.0)
    # cos([1, 2, 0], [0, 1, 1]) = 2 / (sqrt(5) sqrt(2))
    two = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]])
    expected = 1.0 - 2.0 / (math.sqrt(5) * math.sqrt(2))
    assert head_diversity(two).item() == pytest.approx(expected)
    # Three heads: mean over the three pairs (a,b)=cos 0, (a,c)=cos 1, (b,c)=cos 0.
    three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    assert head_diversity(three).item() == pytest.approx(1.0 - 1.0 / 3)


def test_head_diversity_single_head_is_zero() -> None:
    out = head_diversity(torch.rand(3, 2, 1, 16))
    assert out.shape == (3, 2)
    assert torch.equal(out, torch.zeros(3, 2))


def test_renormalize_patches() -> None:
    row = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0, 0.1, 0.2, 0.7]])
    out = renormalize_patches(row)
    expected = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, expected)


def test_delta_pct() -> None:
    """The one drift formula (attndrift.signals.drift_pct): NaN, not ±inf, from a zero
    baseline (more cases in test_signals.py)."""
    assert delta_pct(1.1, 1.0) == pytest.approx(10.0)
    assert delta_pct(2.0, 4.0) == pytest.approx(-50.0)
    assert math.isnan(delta_pct(1.0, 0.0)) and math.isnan(delta_pct(0.0, 0.0))


def test_metrics_registry() -> None:
    assert set(METRICS) == {"entropy", "erf", "gini", "head_diversity", "attention_distance"}
    assert REEXPORTED_METRICS is METRICS
    assert METRICS["entropy"].unit == "nats"
    assert METRICS["erf"].unit == "fraction"
    assert METRICS["gini"].unit == "" and METRICS["head_diversity"].unit == ""
    for name, info in METRICS.items():
        assert isinstance(info, MetricInfo) and info.name == name
        assert info.label and "higher" in info.meaning
    with pytest.raises(AttributeError):
        METRICS["gini"].unit = "x"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# Independent float64 reference with plain loops
# ---------------------------------------------------------------------------------------------


def _ref_entropy(row: np.ndarray) -> float:
    return float(-sum(v * math.log(v) for v in row if v > 0))


def _ref_erf(row: np.ndarray, mass: float = 0.95) -> float:
    total = float(np.sum(row))
    running = 0.0
    for k, v in enumerate(sorted(row, reverse=True), start=1):
        running += v
        if running >= mass * total:
            return k / len(row)
    return 1.0


def _ref_gini(row: np.ndarray) -> float:
    xs = sorted(row)
    n = len(xs)
    weighted = sum(i * v for i, v in enumerate(xs, start=1))
    return 2 * weighted / (n * sum(xs)) - (n + 1) / n


def _ref_head_diversity(maps: np.ndarray) -> float:
    h = maps.shape[0]
    cosines = []
    for i in range(h):
        for j in range(i + 1, h):
            a, b = maps[i], maps[j]
            cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return 1.0 - sum(cosines) / len(cosines)


@pytest.fixture(scope="module")
def random_maps() -> torch.Tensor:
    """[7 images, 3 layers, 4 heads, 49 patches] peaked and flat softmax maps, float64."""
    gen = torch.Generator().manual_seed(1234)
    logits = torch.randn(7, 3, 4, 49, generator=gen, dtype=torch.float64)
    temperature = torch.linspace(0.3, 3.0, 4, dtype=torch.float64).view(1, 1, 4, 1)
    return torch.softmax(logits * temperature, dim=-1)


def test_metrics_match_loop_reference(random_maps: torch.Tensor) -> None:
    arr = random_maps.numpy()
    n_img, n_layers, n_heads, _ = arr.shape
    got = {"entropy": entropy(random_maps), "erf": erf(random_maps), "gini": gini(random_maps)}
    refs = {"entropy": _ref_entropy, "erf": _ref_erf, "gini": _ref_gini}
    for name, fn in refs.items():
        assert got[name].shape == (n_img, n_layers, n_heads)
        assert got[name].dtype == torch.float64
        expected = np.array(
            [
                [[fn(arr[i, layer, h]) for h in range(n_heads)] for layer in range(n_layers)]
                for i in range(n_img)
            ]
        )
        np.testing.assert_allclose(got[name].numpy(), expected, atol=1e-6, rtol=0, err_msg=name)
    # The erf values must not all be the same (a meaningful comparison).
    assert len(np.unique(got["erf"].numpy())) > 3
    div = head_diversity(random_maps)
    assert div.shape == (n_img, n_layers)
    expected_div = np.array(
        [[_ref_head_diversity(arr[i, layer]) for layer in range(n_layers)] for i in range(n_img)]
    )
    np.testing.assert_allclose(div.numpy(), expected_div, atol=1e-6, rtol=0)


def _grid(n: int) -> list[tuple[int, int]]:
    side = math.isqrt(n)
    return [(i // side, i % side) for i in range(n)]  # row-major, as ViTs flatten patches


def _ref_cls_distance(row: np.ndarray) -> float:
    """sum_jk p_j p_k |pos_j - pos_k| / (sum p)^2 by plain loops in float64."""
    pos, total = _grid(len(row)), float(np.sum(row))
    return sum(float(a) * float(b) * math.dist(pa, pb) for a, pa in zip(row, pos, strict=True)
               for b, pb in zip(row, pos, strict=True)) / total**2


def _ref_query_distance(rows: np.ndarray) -> list[float]:
    pos = _grid(rows.shape[-1])
    return [sum(float(a) * math.dist(pos[i], pos[j]) for j, a in enumerate(row)) / float(sum(row))
            for i, row in enumerate(rows)]


def test_attention_distance_closed_forms() -> None:
    """Mean attention distance in patch widths: uniform CLS attention on a 2x2 grid, the mean
    over the 16 ordered pairs (0, 1, 1, sqrt 2 from each patch) = (2 + sqrt 2) / 4; one patch:
    0; half on each of two opposite corners of a 3x3 grid: half the pairs 2 sqrt 2 apart."""
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    assert attention_distance(uniform).item() == pytest.approx((2 + math.sqrt(2)) / 4, abs=1e-15)
    for n in (4, 9, 49):
        one = torch.zeros(n, dtype=torch.float64)
        one[n // 3] = 1.0
        assert attention_distance(one).item() == 0.0
    corners = torch.zeros(9, dtype=torch.float64)
    corners[0] = corners[8] = 0.5
    assert attention_distance(corners).item() == pytest.approx(math.sqrt(2), abs=1e-15)
    assert attention_distance(7 * corners).item() == pytest.approx(math.sqrt(2), abs=1e-15)
    # uniform 3x3 against plain float64 loops: sum over the 81 pairs / 81
    loops = sum(math.dist(a, b) for a in _grid(9) for b in _grid(9)) / 81
    assert attention_distance(torch.full((9,), 1 / 9, dtype=torch.float64)).item() == \
        pytest.approx(loops, abs=1e-14)
    with pytest.raises(ValueError, match="square grid"):
        attention_distance(torch.full((10,), 0.1))


def test_query_attention_distance_closed_forms() -> None:
    """The papers' per-query definition: uniform rows on a 2x2 grid give (2 + sqrt 2) / 4 for
    every query, attention on itself 0, attention on the opposite corner sqrt 2."""
    uniform = torch.full((4, 4), 0.25, dtype=torch.float64)
    torch.testing.assert_close(query_attention_distance(uniform),
                               torch.full((4,), (2 + math.sqrt(2)) / 4, dtype=torch.float64))
    assert (query_attention_distance(torch.eye(9, dtype=torch.float64)) == 0).all()
    opposite = torch.eye(4, dtype=torch.float64).flip(-1)  # 0 <-> 3, 1 <-> 2: the diagonals
    torch.testing.assert_close(query_attention_distance(opposite),
                               torch.full((4,), math.sqrt(2), dtype=torch.float64))
    with pytest.raises(ValueError, match="N, N"):
        query_attention_distance(torch.rand(4, 9))


def test_attention_distances_match_float64_loops() -> None:
    gen = torch.Generator().manual_seed(5)
    p = torch.softmax(3 * torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64), -1)
    p[0, 0, :, 5] = 0.0  # exact zeros, rows no longer normalised
    got = query_attention_distance(p)
    assert got.shape == (2, 3, 16)
    for b in range(2):
        for h in range(3):
            np.testing.assert_allclose(got[b, h].numpy(), _ref_query_distance(p[b, h].numpy()),
                                       atol=1e-12, rtol=0)
            for q in range(16):
                assert attention_distance(p[b, h, q]).item() == pytest.approx(
                    _ref_cls_distance(p[b, h, q].numpy()), abs=1e-12)
    # float32 input stays float32 and close
    assert attention_distance(p.float()).dtype == torch.float32
    np.testing.assert_allclose(attention_distance(p.float()).numpy(),
                               attention_distance(p).numpy(), atol=1e-5, rtol=0)


def _ref_summary(arr: np.ndarray) -> dict:
    n_img, n_layers, n_heads, _ = arr.shape
    fns = {"entropy": _ref_entropy, "erf": _ref_erf, "gini": _ref_gini,
           "attention_distance": _ref_cls_distance}
    out: dict = {"mean": {}}
    for name, fn in fns.items():
        heads, layers = [], []
        for layer in range(n_layers):
            per_head = []
            for h in range(n_heads):
                per_head.append(sum(fn(arr[i, layer, h]) for i in range(n_img)) / n_img)
            heads.append(per_head)
            layers.append(sum(per_head) / n_heads)
        out[name] = {"layers": layers, "heads": heads}
        out["mean"][name] = sum(layers) / n_layers
    diversity = []
    for layer in range(n_layers):
        avg_maps = np.stack(
            [sum(arr[i, layer, h] for i in range(n_img)) / n_img for h in range(n_heads)]
        )
        diversity.append(_ref_head_diversity(avg_maps))
    out["head_diversity"] = {"layers": diversity}
    out["mean"]["head_diversity"] = sum(diversity) / n_layers
    return out


def test_summarize_matches_loop_reference(random_maps: torch.Tensor) -> None:
    got = summarize(random_maps)
    json.dumps(got)  # plain Python only
    ref = _ref_summary(random_maps.numpy())
    assert set(got) == set(ref)
    for name in ("entropy", "erf", "gini", "attention_distance"):
        assert set(got[name]) == {"layers", "heads"}
        np.testing.assert_allclose(got[name]["layers"], ref[name]["layers"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(got[name]["heads"], ref[name]["heads"], atol=1e-6, rtol=0)
        assert len(got[name]["heads"]) == 3 and len(got[name]["heads"][0]) == 4
    assert set(got["head_diversity"]) == {"layers"}
    np.testing.assert_allclose(
        got["head_diversity"]["layers"], ref["head_diversity"]["layers"], atol=1e-6, rtol=0
    )
    assert set(got["mean"]) == set(METRICS)
    for name, value in got["mean"].items():
        assert isinstance(value, float)
        assert value == pytest.approx(ref["mean"][name], abs=1e-6)


def test_summarize_float32_close_to_float64(random_maps: torch.Tensor) -> None:
    got = summarize(random_maps.float())
    ref = summarize(random_maps)
    for name in ("entropy", "gini", "head_diversity"):
        assert got["mean"][name] == pytest.approx(ref["mean"][name], abs=1e-5)


def test_summarize_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="n_images, L, H, N"):
        summarize(torch.rand(3, 4, 5))


# ---------------------------------------------------------------------------------------------
# Half precision and shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(3 * torch.randn(6, 4, 196, generator=gen), dim=-1)
    p[:, :, ::3] = 0.0  # exact zeros: a log(p + eps) implementation goes wrong here in half
    p = p / p.sum(dim=-1, keepdim=True)
    low = p.to(dtype)
    reference = low.float()  # same values, so only the arithmetic differs
    for fn in (entropy, erf, gini, head_diversity):
        out = fn(low)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all(), fn.__name__
        torch.testing.assert_close(out, fn(reference), atol=1e-5, rtol=1e-5)
    # And close to the unrounded float32 maps, within the input rounding.
    torch.testing.assert_close(entropy(low), entropy(p), atol=0.05, rtol=0.0)
    assert renormalize_patches(low).dtype == dtype


def test_leading_dims_preserved() -> None:
    p = torch.softmax(torch.randn(2, 3, 5, 6, 10), dim=-1)
    for fn in (entropy, erf, gini):
        assert fn(p).shape == (2, 3, 5, 6)
    assert head_diversity(p).shape == (2, 3, 5)
    assert entropy(p[0, 0, 0, 0]).shape == ()
    assert renormalize_patches(p).shape == (2, 3, 5, 6, 9)
    # Batched results equal row-by-row results.
    flat = p.reshape(-1, 10)
    torch.testing.assert_close(
        gini(p).reshape(-1), torch.stack([gini(flat[i]) for i in range(flat.shape[0])])
    )
    torch.testing.assert_close(
        head_diversity(p).reshape(-1),
        torch.stack([head_diversity(m) for m in p.reshape(-1, 6, 10)]),
    )


def test_large_input_matches_float64_reference() -> None:
    """A probe-sized float32 input with exact zeros and many ties: ERF equals an independent
    vectorised float64 computation (descending sort, running sum, first k reaching the mass,
    no tolerance), Gini and entropy within float32 rounding."""
    gen = torch.Generator().manual_seed(3)
    p = torch.softmax(4 * torch.randn(120, 4, 12, 49, generator=gen), dim=-1)
    p[:8, :, :, ::4] = 0.0  # exact zeros
    p[8:16] = p[8:16].round(decimals=2)  # many ties
    x = p.double().numpy()
    desc = -np.sort(-x, axis=-1)
    cum = np.cumsum(desc, axis=-1)
    for mass in (0.5, 0.95, 1.0):
        k = (cum < mass * cum[..., -1:]).sum(axis=-1) + 1
        np.testing.assert_array_equal(erf(p, mass=mass).numpy(), (k / 49).astype(np.float32))
    asc = np.sort(x, axis=-1)
    ranks = np.arange(1, 50)
    ref_gini = 2 * (asc * ranks).sum(-1) / (49 * asc.sum(-1)) - 50 / 49
    np.testing.assert_allclose(gini(p).numpy(), ref_gini, atol=1e-6, rtol=0)
    safe = np.where(x > 0, x, 1.0)
    np.testing.assert_allclose(entropy(p).numpy(), -(x * np.log(safe)).sum(-1), atol=2e-6, rtol=0)
    assert (erf(p, mass=1.0)[:8] < 1.0).all()  # zeros are not needed for the full mass


def test_entropy_and_gini_are_differentiable() -> None:
    """Regularizers differentiate through the metrics: gradients match finite differences."""
    gen = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(3, 9, generator=gen, dtype=torch.float64), dim=-1)
    assert torch.autograd.gradcheck(entropy, (p.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(gini, (p.clone().requires_grad_(),))
    assert erf(p.clone().requires_grad_()).shape == (3,)
