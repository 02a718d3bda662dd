"""The multiscale assignment and its shortest-augmenting-path kernels: every path returns a permutation whose
cost equals POT's or scipy's optimum on the same batch, and a wrong answer fails its certificate."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ot_cfm.couplers import augmenting_paths, multiscale
from ot_cfm.couplers.augmenting_paths import dense_assignment, sparse_assignment, violations
from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.kd_pyramid import c_transform, coarsen, kd_order
from ot_cfm.couplers.multiscale import dense_below, multiscale_assignment


def pot_optimum(x, y):
    c = torch.cdist(x.double(), y.double()).pow(2).numpy()
    mass = np.full(len(c), 1.0 / len(c))
    return len(c) * ot.emd2(mass, mass, c, numItermax=10**9), c


def total_cost(c, perm):
    return float(c[np.arange(len(c)), perm.numpy()].sum())


def mixture(n, d, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + offset
    centres = 3.0 * torch.randn(5, d, generator=g, dtype=torch.float64)
    y = centres[torch.randint(5, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, y


def sorted_by_first_coordinate(x, y):
    return x[x[:, 0].argsort()], y[y[:, 0].argsort()]


def with_duplicates(x, y):
    # ties everywhere: every target appears twice, the sources four times
    return x[: len(x) // 4].repeat(4, 1), y[: len(y) // 2].repeat(2, 1)


CASES = {
    "mixture d=2": lambda: mixture(203, 2, 0),
    "mixture d=100 (no coarse levels)": lambda: mixture(150, 100, 12),
    "mixture d=1": lambda: mixture(150, 1, 1),
    "mixture d=5, odd size": lambda: mixture(177, 5, 2),
    "sorted batches (strided halves see one end)": lambda: sorted_by_first_coordinate(*mixture(160, 2, 3)),
    "duplicated points (ties)": lambda: with_duplicates(*mixture(160, 2, 4)),
    "large offset (norms dominate the cost)": lambda: mixture(128, 3, 5, offset=200.0),
}



def certified(c, sigma, u, v, tol=1e-9):
    """Whether duals u, v certify sigma for the cost c: R = c - v - u >= -tol, and R <= tol on sigma."""
    reduced = c - v[None, :] - u[:, None]
    return reduced.min() >= -tol and reduced[np.arange(len(c)), sigma].max() <= tol


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("neighbours", [1, 4, 8])
def test_certified_permutation_reaches_pots_optimum(case, neighbours):
    """Sparse levels (base 16, below every case's size) with 1 to 8 candidates per row and column."""
    x, y = CASES[case]()
    perm = multiscale_assignment(x, y, neighbours=neighbours, base=16)
    assert torch.equal(perm.sort().values, torch.arange(len(x))), "a permutation"
    optimum, c = pot_optimum(x, y)
    assert total_cost(c, perm) == pytest.approx(optimum, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64])
@pytest.mark.parametrize("case", ["random", "integer ties", "all equal"])
def test_dense_solver_matches_scipy_from_any_start_and_certifies(n, case):
    rng = np.random.default_rng(n)
    c = {"random": lambda: rng.normal(size=(n, n)), "integer ties": lambda: rng.integers(0, 3, (n, n)).astype(float),
         "all equal": lambda: np.ones((n, n))}[case]()
    r, s = linear_sum_assignment(c)
    for start in (np.zeros(n), rng.normal(size=n), 100.0 * rng.normal(size=n)):
        sigma, u, v = dense_assignment(c, start.copy())
        assert sorted(sigma) == list(range(n))
        assert c[np.arange(n), sigma].sum() == pytest.approx(c[r, s].sum(), abs=1e-9)
        assert certified(c, sigma, u, v)


@pytest.mark.parametrize("k", [1, 3, 200])
def test_sparse_solver_certifies_on_the_full_grid(k):
    """From v = 0 one candidate per row and column misses optimal arcs: rounds add them until the
    duals certify the permutation on all n^2 arcs; with no round allowed it reports failure."""
    rng = np.random.default_rng(k)
    c = -rng.normal(size=(120, 2)) @ rng.normal(size=(2, 120))
    r, s = linear_sum_assignment(c)
    sigma, u, v, ok = sparse_assignment(c, np.zeros(120), k, 1e-10, 50)
    assert ok and certified(c, sigma, u, v)
    assert c[np.arange(120), sigma].sum() == pytest.approx(c[r, s].sum(), abs=1e-9)
    if k == 1:
        assert not sparse_assignment(c, np.zeros(120), k, 1e-10, 0)[3]


def test_violations_names_the_arcs_below_tolerance():
    c = np.array([[0.0, 1.0], [1.0, 0.0]])
    count, lowest, on_plan = violations(c, np.zeros(2), np.zeros(2), np.array([1, 0]), 1e-10, 2,
                                        np.empty(4, np.int64), np.empty(4, np.int64))
    assert (count, lowest, on_plan) == (0, 0.0, 1.0), "dual feasible, but the swap is not tight"
    rows, cols = np.empty(4, np.int64), np.empty(4, np.int64)
    count, lowest, _ = violations(c, np.array([0.5, 0.0]), np.zeros(2), np.array([0, 1]), 1e-10, 2, rows, cols)
    assert (count, lowest, rows[0], cols[0]) == (1, -0.5, 0, 0)


def test_kd_order_is_a_permutation_whose_aligned_blocks_are_clusters():
    points = np.random.default_rng(0).permutation(np.arange(12.0))[:, None]  # 1-d: the k-d order sorts
    order = kd_order(points)
    assert np.array_equal(points[order, 0], np.arange(12.0))
    two_d = np.random.default_rng(1).normal(size=(64, 2))
    order = kd_order(two_d)
    assert sorted(order) == list(range(64))
    first, second = two_d[order[:32]], two_d[order[32:]]  # the first split: along the widest coordinate
    axis = np.argmax(two_d.max(0) - two_d.min(0))
    assert first[:, axis].max() <= second[:, axis].min()


def test_coarse_cost_is_the_cost_of_pair_means():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
    pairs, coarse = coarsen(-x @ y.T)
    means = lambda p: np.stack([p[2 * c: 2 * c + 2].mean(0) for c in range(4)])  # noqa: E731 (last alone)
    np.testing.assert_allclose(pairs, -means(x) @ y.T, atol=1e-12)
    np.testing.assert_allclose(coarse, -means(x) @ means(y).T, atol=1e-12)
    u = rng.normal(size=4)
    np.testing.assert_allclose(c_transform(pairs, u), (pairs - u[:, None]).min(0))


def test_without_rounds_the_dense_solver_finishes_exactly(monkeypatch):
    monkeypatch.setattr(multiscale, "_MAX_ROUNDS", 0)
    x, y = mixture(100, 2, 7)
    perm = multiscale_assignment(x, y, neighbours=1, base=20)
    optimum, c = pot_optimum(x, y)
    assert total_cost(c, perm) == pytest.approx(optimum, rel=1e-12)


def test_float32_input_and_the_coupler_backend_agree():
    x, y = mixture(300, 2, 9)
    x32, y32 = x.float(), y.float()
    perm = multiscale_assignment(x32, y32)
    assert perm.dtype == torch.long
    i, j = ExactOTCoupler("multiscale").indices(x32.reshape(300, 1, 2), y32.reshape(300, 1, 2))
    optimum, c = pot_optimum(x32, y32)
    assert total_cost(c, perm) == pytest.approx(optimum, rel=1e-12)
    assert total_cost(c, j) == pytest.approx(optimum, rel=1e-12)


def test_auto_picks_the_certified_solver_for_equal_uniform_batches():
    """Every equal uniform batch goes to the certified solver (before: scipy, uncertified, below B = 1024
    at d >= 16 and below 129 at d = 2); unequal sizes to POT."""
    coupler = ExactOTCoupler()
    for b, d in ((64, 2), (128, 784), (256, 32), (1024, 784), (2048, 2)):
        assert coupler.choose_solver(b, b, d) == "multiscale"
    assert coupler.choose_solver(1024, 1000, 2) == "pot"
    assert dense_below(2) < 64 < 128 <= dense_below(32), "d = 2 has coarse levels from B = 64"


@pytest.mark.parametrize("x_shape, y_shape, kwargs, match", [
    ((5, 2), (6, 2), {}, "same shape"),
    ((5, 2, 1), (5, 2, 1), {}, "same shape"),
    ((0, 2), (0, 2), {}, "empty"),
    ((5, 2), (5, 2), {"neighbours": 0}, "positive"),
    ((5, 2), (5, 2), {"base": 0}, "positive"),
])
def test_bad_input_raises(x_shape, y_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        multiscale_assignment(torch.zeros(x_shape), torch.zeros(y_shape), **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_raises(value):
    x, y = mixture(10, 2, 0)
    y[3, 1] = value
    with pytest.raises(ValueError, match="NaN or inf"):
        multiscale_assignment(x, y)


def test_tiny_scale_and_offset_reach_the_unit_scale_optimum():
    """Points scaled by 1e-7 or offset by 1e6, solved through the sparse levels: the permutation is
    optimal for the unit-scale points."""
    x, y = mixture(400, 2, 10)
    optimum, c = pot_optimum(x, y)
    for scale, offset in ((1e-7, 0.0), (1.0, 1e6), (1e-70, 0.0), (1e70, 0.0)):
        perm = multiscale_assignment(offset + scale * x, offset + scale * y, base=64)
        assert total_cost(c, perm) == pytest.approx(optimum, rel=1e-9)


def test_an_outlier_row_missed_by_the_sampled_scale_does_not_overflow_the_cost():
    """centre_and_scale reads every 4th row at B = 64, d = 784; an outlier in row 1 of both batches (2^600) made
    -<x_i, y_j> overflow to inf (before: ``ExactOTCoupler()`` raised scipy's "matrix contains invalid numeric
    entries"). Now the batches are divided by their largest entry: the outliers are paired (they are nearly
    equal), every target is used once."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(64, 784, generator=g, dtype=torch.float64) for _ in range(2))
    x[1] *= 2.0 ** 600
    y[1] = 1.001 * x[1]
    for perm in (multiscale_assignment(x, y), ExactOTCoupler().indices(x, y)[1]):
        assert perm[1] == 1 and torch.equal(perm.sort().values, torch.arange(64))


def _swapping(solve):
    """A solver that answers with the targets of rows 0 and 1 swapped (duals unchanged)."""
    def swapped(*args):
        sigma, *rest = solve(*args)
        sigma = sigma.copy()
        sigma[[0, 1]] = sigma[[1, 0]]
        return (sigma, *rest)
    return swapped


@pytest.mark.parametrize("n, base, rounds", [(40, 64, 20), (200, 64, 20), (200, 64, 0)],
                         ids=["dense", "sparse", "dense after the rounds"])
def test_a_wrong_answer_raises_instead_of_returning(monkeypatch, n, base, rounds):
    """Whichever path answers (dense at or below base, sparse rounds, the dense solver after them), a
    permutation that its duals do not certify raises RuntimeError."""
    for name in ("dense_assignment", "sparse_assignment"):
        monkeypatch.setattr(augmenting_paths, name, _swapping(getattr(augmenting_paths, name)))
    monkeypatch.setattr(multiscale, "_MAX_ROUNDS", rounds)
    x, y = mixture(n, 2, 11)
    with pytest.raises(RuntimeError, match="fails its optimality certificate"):
        multiscale_assignment(x, y, base=base, neighbours=1)
