"""Multiscale column generation: the certified permutation is optimal against POT on the same batch."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import scipy.sparse
import torch

from ot_cfm.couplers import multiscale
from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.multiscale import multiscale_assignment


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
    "mixture d=1": lambda: mixture(150, 1, 1),
    "mixture d=5, odd size": lambda: mixture(177, 5, 2),
    "sorted batches (strided halves see one end)": lambda: sorted_by_first_coordinate(*mixture(160, 2, 3)),
    "duplicated points (ties)": lambda: with_duplicates(*mixture(160, 2, 4)),
    "large offset (norms dominate the cost)": lambda: mixture(128, 3, 5, offset=200.0),
}


@pytest.fixture
def count_solves(monkeypatch):
    """Counts POT calls: a sparse solve per column-generation round, a dense one per base level."""
    calls = {"sparse": 0, "dense": 0}
    solve = multiscale.network_simplex

    def counted(cost):
        calls["dense" if isinstance(cost, np.ndarray) else "sparse"] += 1
        return solve(cost)

    monkeypatch.setattr(multiscale, "network_simplex", counted)
    return calls


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("neighbours", [1, 4, 48])
def test_certified_permutation_reaches_pots_optimum(case, neighbours, count_solves):
    x, y = CASES[case]()
    perm = multiscale_assignment(x, y, neighbours=neighbours, base=16)
    assert torch.equal(perm.sort().values, torch.arange(len(x))), "a permutation"
    optimum, c = pot_optimum(x, y)
    assert total_cost(c, perm) == pytest.approx(optimum, rel=1e-12, abs=1e-9)
    assert count_solves["dense"] == 1 and count_solves["sparse"] >= 3, "the recursion ran its levels"


def test_one_neighbour_needs_column_generation_rounds(count_solves):
    # levels 32 -> 64 -> 128 -> 256 with one candidate per row and column: the first sparse solves
    # cannot all be optimal, so the certificate must have rejected some and added arcs
    x, y = mixture(256, 2, 6)
    perm = multiscale_assignment(x, y, neighbours=1, base=32)
    optimum, c = pot_optimum(x, y)
    assert total_cost(c, perm) == pytest.approx(optimum, rel=1e-12)
    assert count_solves["sparse"] > 3


def test_without_rounds_the_dense_fallback_is_exact(monkeypatch, count_solves):
    monkeypatch.setattr(multiscale, "_MAX_ROUNDS", 0)
    x, y = mixture(100, 2, 7)
    perm = multiscale_assignment(x, y, base=20)
    optimum, c = pot_optimum(x, y)
    assert total_cost(c, perm) == pytest.approx(optimum, rel=1e-12)
    assert count_solves["sparse"] == 0


def test_small_batches_are_solved_densely(count_solves):
    x, y = mixture(40, 3, 8)
    perm = multiscale_assignment(x, y)
    optimum, c = pot_optimum(x, y)
    assert total_cost(c, perm) == pytest.approx(optimum, rel=1e-12)
    assert count_solves == {"sparse": 0, "dense": 1}


def test_float32_input_and_the_coupler_backend_agree():
    x, y = mixture(300, 2, 9)
    x32, y32 = x.float(), y.float()
    perm = multiscale_assignment(x32, y32, base=64)
    assert perm.dtype == torch.long
    i, j = ExactOTCoupler("multiscale").indices(x32.reshape(300, 1, 2), y32.reshape(300, 1, 2))
    optimum, c = pot_optimum(x32, y32)
    assert total_cost(c, perm) == pytest.approx(optimum, rel=1e-12)
    assert total_cost(c, j) == pytest.approx(optimum, rel=1e-12)


def test_auto_picks_multiscale_at_low_dimension_and_large_batches():
    coupler = ExactOTCoupler()
    assert coupler.choose_solver(128, 128, 2) == "scipy"
    assert coupler.choose_solver(256, 256, 2) == "multiscale"
    assert coupler.choose_solver(256, 256, 4) == "scipy"
    assert coupler.choose_solver(1024, 1024, 2) == "multiscale"
    assert coupler.choose_solver(1024, 1024, 16) == "multiscale"
    assert coupler.choose_solver(512, 512, 16) == "scipy"
    assert coupler.choose_solver(2048, 2048, 64) == "multiscale"
    assert coupler.choose_solver(2048, 2048, 784) == "scipy"
    assert coupler.choose_solver(1024, 1000, 2) == "pot"


@pytest.mark.parametrize("x_shape, y_shape, kwargs, match", [
    ((5, 2), (6, 2), {}, "same shape"),
    ((5, 2, 1), (5, 2, 1), {}, "same shape"),
    ((0, 2), (0, 2), {}, "empty"),
    ((5, 2), (5, 2), {"neighbours": 0}, "positive"),
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


def test_tiny_scale_and_offset_reach_the_unit_scale_optimum(count_solves):
    """Points scaled by 1e-7 or offset by 1e6, solved through the sparse levels: the permutation is
    optimal for the unit-scale points (before centring and scaling: 1.6 % above it at 1e-6, B = 1024)."""
    x, y = mixture(400, 2, 10)
    optimum, c = pot_optimum(x, y)
    for scale, offset in ((1e-7, 0.0), (1.0, 1e6)):
        perm = multiscale_assignment(offset + scale * x, offset + scale * y, base=64)
        assert total_cost(c, perm) == pytest.approx(optimum, rel=1e-9)
    assert count_solves["sparse"] >= 4


def _swapping(solve):
    """A network simplex that answers with the targets of sources 0 and 1 swapped (duals unchanged)."""
    def swapped(cost):
        plan, u, v = solve(cost)
        if isinstance(plan, np.ndarray):
            return plan[[1, 0, *range(2, plan.shape[0])]], u, v
        plan = plan.tocoo()
        rows = plan.row.copy()
        rows[plan.row == 0], rows[plan.row == 1] = 1, 0
        return scipy.sparse.coo_array((plan.data, (rows, plan.col)), shape=plan.shape), u, v
    return swapped


@pytest.mark.parametrize("n, base, rounds", [(40, 64, 50), (200, 64, 50), (200, 64, 0)],
                         ids=["dense", "sparse", "dense fallback"])
def test_a_wrong_answer_from_pot_raises_instead_of_returning(monkeypatch, n, base, rounds):
    """Whichever path answers (dense at or below base, sparse rounds, the dense fallback after them),
    a plan that its duals do not certify raises RuntimeError."""
    monkeypatch.setattr(multiscale, "network_simplex", _swapping(multiscale.network_simplex))
    monkeypatch.setattr(multiscale, "_MAX_ROUNDS", rounds)
    x, y = mixture(n, 2, 11)
    with pytest.raises(RuntimeError, match="fails its optimality certificate"):
        multiscale_assignment(x, y, base=base)
