"""Minibatch couplers: exactness against scipy and POT, marginals, pairing, entropic limit, bad input."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import scipy.sparse
import torch
from scipy.optimize import linear_sum_assignment

from ot_cfm.couplers import exact as exact_module
from ot_cfm.couplers import network_simplex as network_simplex_module
from ot_cfm.couplers.base import centre_and_scale, sample_rows
from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.independent import IndependentCoupler
from ot_cfm.couplers.multiscale import dense_below
from ot_cfm.couplers.network_simplex import certificate_tolerance, certify
from ot_cfm.couplers.sinkhorn import SinkhornCoupler

EXACT_BACKENDS = ["auto", "scipy", "multiscale", "pot"]
SHAPES = [(2, 2), (16, 3), (48, 64), (40, 784), (32, 1, 8, 8)]  # (B, *shape), first entry: B = 2, d = 2


def batches(shape, b1=None, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x0 = scale * torch.randn(shape, generator=g, dtype=dtype)
    x1 = scale * (torch.randn((b1 or shape[0], *shape[1:]), generator=g, dtype=dtype) * 0.7 + 1.0)
    return x0, x1


def sq_cost(x0, x1):
    return torch.cdist(x0.flatten(1).double(), x1.flatten(1).double()).pow(2)


def optimum(x0, x1):
    c = sq_cost(x0, x1).numpy()
    return ot.emd2(np.full(c.shape[0], 1 / c.shape[0]), np.full(c.shape[1], 1 / c.shape[1]), c, numItermax=10**9)


# ---------------------------------------------------------------- exact, equal sizes


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_exact_pairs_are_an_optimal_permutation(backend, shape):
    x0, x1 = batches(shape, seed=len(shape) + shape[0])
    i, j = ExactOTCoupler(backend).indices(x0, x1)
    b = shape[0]
    assert torch.equal(torch.sort(i).values, torch.arange(b)), "every source exactly once"
    assert torch.equal(torch.sort(j).values, torch.arange(b)), "every target exactly once"
    cost = float(((x0[i] - x1[j]).flatten(1) ** 2).sum(1).mean())
    c = sq_cost(x0, x1).numpy()
    r, s = linear_sum_assignment(c)
    assert cost == pytest.approx(c[r, s].mean(), rel=1e-12)
    assert cost == pytest.approx(optimum(x0, x1), rel=1e-12)


DEGENERATE = {
    "B = 1": lambda: batches((1, 2)),
    "B = 2, coinciding sources": lambda: (torch.zeros(2, 3, dtype=torch.float64), batches((2, 3))[1]),
    "all points equal": lambda: (torch.ones(300, 2, dtype=torch.float64), torch.ones(300, 2, dtype=torch.float64)),
    "duplicated points, sparse levels": lambda: (batches((75, 2), seed=3)[0].repeat(4, 1), batches((150, 2), seed=4)[1].repeat(2, 1)),
    "duplicated points, d = 100": lambda: (batches((75, 100), seed=5)[0].repeat(4, 1), batches((300, 100), seed=6)[1]),
    "one distinct point per batch": lambda: (torch.randn(1, 2, dtype=torch.float64).expand(260, 2).clone(),
                                             torch.randn(260, 2, dtype=torch.float64)),
    "non-contiguous (transposed) batches": lambda: tuple(t.T for t in batches((2, 200), seed=7)),
}


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("case", DEGENERATE)
def test_exact_degenerate_batches_reach_scipys_optimum(backend, case):
    """Ties everywhere (duplicates, equal points), B = 1 and 2, the dense and the sparse paths (B = 260 and
    300 > 256 at d = 2 and 100): a permutation whose cost equals scipy's on the same batch."""
    x0, x1 = DEGENERATE[case]()
    i, j = ExactOTCoupler(backend).indices(x0, x1)
    assert torch.equal(torch.sort(j).values, torch.arange(len(x0)))
    c = sq_cost(x0, x1).numpy()
    r, s = linear_sum_assignment(c)
    assert c[i.numpy(), j.numpy()].sum() == pytest.approx(c[r, s].sum(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_exact_beats_identity_pairing_and_plan_is_permutation(backend):
    x0, x1 = batches((64, 4), seed=3)
    p = ExactOTCoupler(backend).plan(x0, x1)
    assert p.shape == (64, 64) and p.dtype == x0.dtype
    assert torch.equal(torch.sort(p.flatten()).values[-64:], torch.full((64,), 1 / 64, dtype=x0.dtype))
    assert torch.count_nonzero(p) == 64
    torch.testing.assert_close(p.sum(0), torch.full((64,), 1 / 64, dtype=x0.dtype))
    torch.testing.assert_close(p.sum(1), torch.full((64,), 1 / 64, dtype=x0.dtype))
    ours = float((p * sq_cost(x0, x1)).sum())
    assert ours == pytest.approx(optimum(x0, x1), rel=1e-12)
    assert ours < float(((x0 - x1) ** 2).sum(1).mean())


def test_exact_backends_agree_and_float32_input():
    x0, x1 = batches((100, 10), seed=5, dtype=torch.float32)
    results = [ExactOTCoupler(b).indices(x0, x1)[1] for b in EXACT_BACKENDS]
    for r in results[1:]:
        assert torch.equal(r, results[0])
    out0, out1 = ExactOTCoupler().pair(x0, x1)
    assert out0.dtype == torch.float32 and out1.dtype == torch.float32


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_labels_follow_their_points(backend):
    x0, x1 = batches((30, 1, 2, 3), seed=7)
    y0, y1 = torch.arange(30) + 100, torch.arange(30) + 200
    p0, p1, q0, q1 = ExactOTCoupler(backend).pair(x0, x1, y0, y1)
    assert torch.equal(p0, x0[q0 - 100]) and torch.equal(p1, x1[q1 - 200])
    p0, p1, q0, q1 = ExactOTCoupler(backend).pair(x0, x1, None, y1)
    assert q0 is None and torch.equal(p1, x1[q1 - 200])


def test_inner_product_cost_gives_the_squared_distance_optimum():
    # the solvers see -<x0, x1>; its optimum must be the squared-distance optimum up to float64 round-off
    x0, x1 = batches((200, 3), seed=11, scale=30.0)  # large norms: the dropped |x|^2 terms dominate
    i, j = ExactOTCoupler("scipy").indices(x0, x1)
    cost = float(((x0[i] - x1[j]) ** 2).sum(1).mean())
    assert abs(cost - optimum(x0, x1)) <= 1e-12 * optimum(x0, x1)


@pytest.mark.filterwarnings("ignore::UserWarning")  # POT's own "numItermax reached" warning
def test_exact_raises_when_pot_stops_early(monkeypatch):
    monkeypatch.setattr(network_simplex_module, "EMD_MAX_ITER", 5)
    x0, x1 = batches((40, 3), seed=1)
    with pytest.raises(RuntimeError, match="optimal"):
        ExactOTCoupler("pot").indices(x0, x1)


@pytest.mark.filterwarnings("ignore::UserWarning")  # POT's own "problem infeasible" warning
def test_network_simplex_raises_on_an_infeasible_sparse_problem():
    # two sources may both only go to target 0: no plan with uniform marginals exists
    cost = scipy.sparse.coo_array((np.ones(2), (np.array([0, 1]), np.array([0, 0]))), shape=(2, 2))
    with pytest.raises(RuntimeError, match="optimal"):
        network_simplex_module.network_simplex(cost)


# ---------------------------------------------------------------- exact at every scale

# (scale, offset0, offset1): the points are offset + scale * (well-conditioned points). Before centring
# and scaling, at B = 512, d = 2: POT and multiscale were 0.4 % (1e-6) and 70 to 120 % (1e-8) above
# the optimum, and an offset of 1e6 put every backend, scipy included, 1e-6 to 5e-6 above it.
SCALES_AND_OFFSETS = [(1e-8, 0.0, 0.0), (1e-6, 0.0, 0.0), (1e8, 0.0, 0.0), (1.0, 1e6, 1e6), (1e-3, 1e3, 1e3),
                      (1e-2, -1e4, -1e4), (1.0, 0.0, 1e6)]
SCALE_B = 512  # above multiscale's dense base at d = 2: its sparse levels run


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("scale, offset0, offset1", SCALES_AND_OFFSETS, ids=str)
def test_exact_is_optimal_at_every_scale_and_offset(backend, scale, offset0, offset1):
    """The permutation found on (offset0 + scale x0, offset1 + scale x1) is optimal for (x0, x1) itself
    (the optimal permutation does not change when a batch is translated or both are scaled): its cost
    on x, in float64, equals scipy's optimum on x to 1e-9 (the transformed points are x rounded to
    about 1e-10 relative)."""
    assert ExactOTCoupler("auto").choose_solver(SCALE_B, SCALE_B, 2) == "multiscale", "auto covers multiscale"
    assert SCALE_B > dense_below(2), "multiscale's sparse levels run"
    x0, x1 = batches((SCALE_B, 2), seed=21)
    i, j = ExactOTCoupler(backend).indices(offset0 + scale * x0, offset1 + scale * x1)
    assert torch.equal(torch.sort(j).values, torch.arange(SCALE_B))
    c = sq_cost(x0, x1).numpy()
    r, s = linear_sum_assignment(c)
    assert c[i.numpy(), j.numpy()].mean() == pytest.approx(c[r, s].mean(), rel=1e-9)


@pytest.mark.parametrize("scale, offset", [(1e-8, 0.0), (1e8, 0.0), (1.0, 1e6)], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
def test_exact_unequal_plan_is_optimal_at_every_scale_and_offset(scale, offset, weighted):
    """Unequal sizes (POT's network simplex, certified): the plan on offset + scale * x costs, on x, what
    POT's plan on x costs; with weights too (a translation changes sum P <x0_i, x1_j> only by terms fixed
    by the marginals)."""
    x0, x1 = batches((300, 2), b1=500, seed=22)
    g = torch.Generator().manual_seed(5)
    w0 = torch.rand(300, generator=g, dtype=torch.float64) + 0.1 if weighted else torch.ones(300, dtype=torch.float64)
    w0 = w0 / w0.sum()
    w1 = torch.full((500,), 1 / 500, dtype=torch.float64)
    p = ExactOTCoupler("auto").plan(offset + scale * x0, offset + scale * x1, weights0=w0 if weighted else None)
    torch.testing.assert_close(p.sum(1), w0, rtol=0, atol=1e-12)
    c = sq_cost(x0, x1)
    expected = ot.emd2(w0.numpy(), w1.numpy(), c.numpy(), numItermax=10**9)
    assert float((p * c).sum()) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("separately", [False, True])
def test_centre_and_scale_translates_and_divides_by_a_power_of_two(separately):
    """One common centre keeps every pairwise distance; separate centres put each offset mean at 0 and
    change the squared distances by a term of i plus a term of j only. Entries end in [-1, 1], at least one
    beyond 1/2, and the inputs are untouched."""
    x0, x1 = batches((40, 3), b1=30, seed=4, scale=1e-3)
    x0, x1 = x0 + 5.0, x1 - 2.0
    before = (x0.clone(), x1.clone())
    a, b, s = centre_and_scale(x0, x1, separately=separately)
    assert math.frexp(s)[0] == 0.5, "a power of two"
    assert 0.5 <= float(torch.cat([a, b]).abs().max()) <= 1.0
    d_scaled = torch.cdist(a, b).pow(2) * s * s
    d = torch.cdist(x0, x1).pow(2)
    if separately:
        torch.testing.assert_close(a.mean(0), torch.zeros(3, dtype=a.dtype), rtol=0, atol=1e-12)
        torch.testing.assert_close(b.mean(0), torch.zeros(3, dtype=b.dtype), rtol=0, atol=1e-12)
        diff = d_scaled - d  # a term of i plus a term of j: every 2 x 2 minor's alternating sum is 0
        minors = diff[1:, 1:] - diff[1:, :1] - diff[:1, 1:] + diff[:1, :1]
        assert float(minors.abs().max()) < 1e-12 * float(d.max())  # rounding of d (about 49); d_scaled is 2e-5
        assert float(diff.abs().max()) > 1.0, "the distance between the means (7 in the first coordinate) left"
    else:
        torch.testing.assert_close(d_scaled, d, rtol=1e-9, atol=0)
    assert torch.equal(x0, before[0]) and torch.equal(x1, before[1]), "inputs untouched"
    if separately:  # a batch whose mean is within half its largest entry stays in place, only scaled
        x0, x1 = batches((40, 3), b1=30, seed=4)
        a, b, s = centre_and_scale(x0, x1 + 3.0, separately=True)
        assert torch.equal(a * s, x0) and float(b.mean(0).abs().max()) < 1e-15
    same = torch.ones(4, 2)
    a, b, s = centre_and_scale(same, same, separately=separately)
    assert math.isfinite(s) and not a.any() and not b.any(), "coinciding points: no division by zero"
    huge = torch.tensor([[1.7e308, -1.7e308], [1e308, 0.0]], dtype=torch.float64)  # sums overflow
    a, b, s = centre_and_scale(huge, huge.flip(0), separately=separately)
    assert 0.5 <= float(torch.cat([a, b]).abs().max()) <= 1.0 and math.isfinite(s)
    tame = huge / 2.0**1000
    torch.testing.assert_close(a * (s / 2.0**1000), tame - tame.mean(0), rtol=1e-15, atol=0)


def test_certificate_accepts_the_optimum_and_rejects_a_wrong_plan():
    """POT's optimal permutation with its duals passes; the same duals with two targets swapped, or
    with one dual raised so that an arc goes negative, are refused."""
    x0, x1 = batches((30, 2), seed=9)
    a, b, _ = centre_and_scale(x0, x1)
    na, nb = (a * a).sum(1), (b * b).sum(1)
    cost = na[:, None] + nb[None, :] - 2 * a @ b.T
    plan, u, v = network_simplex_module.network_simplex(cost.numpy())
    reduced = cost - torch.from_numpy(u)[:, None] - torch.from_numpy(v)[None, :]
    tol = certificate_tolerance(na, nb)
    rows, perm = torch.arange(30), torch.from_numpy(plan.argmax(1))
    certify(reduced, rows, perm, tol, solver="test")
    swapped = perm.clone()
    swapped[[0, 1]] = perm[[1, 0]]
    with pytest.raises(RuntimeError, match="test returned a plan that fails its optimality certificate"):
        certify(reduced, rows, swapped, tol, solver="test")
    lowered = reduced.clone()
    lowered[3] -= 1e-6  # u_3 raised by 1e-6: row 3 is dual infeasible
    with pytest.raises(RuntimeError, match="optimality certificate"):
        certify(lowered, rows, perm, tol, solver="test")


@pytest.mark.parametrize("b1", [40, 55], ids=["equal", "unequal"])
def test_exact_pot_raises_instead_of_returning_a_suboptimal_plan(monkeypatch, b1):
    """A network simplex that answers with two sources' targets swapped (and the optimal duals) is caught."""
    solve = network_simplex_module.network_simplex

    def swapped(cost, a=None, b=None):
        plan, u, v = solve(cost, a, b)
        return plan[[1, 0, *range(2, len(plan))]], u, v

    monkeypatch.setattr(exact_module, "network_simplex", swapped)
    x0, x1 = batches((40, 2), b1=b1, seed=3)
    with pytest.raises(RuntimeError, match="POT network simplex .ExactOTCoupler. returned a plan that fails"):
        ExactOTCoupler("pot").plan(x0, x1)


# ---------------------------------------------------------------- exact, unequal sizes


@pytest.mark.parametrize("b0,b1", [(20, 13), (13, 20), (1, 7), (50, 64)])
@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)], ids=str)
def test_exact_unequal_sizes_plan_is_optimal_with_exact_marginals(b0, b1, shape):
    x0, x1 = batches((b0, *shape), b1=b1, seed=b0 * b1)
    coupler = ExactOTCoupler("auto")
    p = coupler.plan(x0, x1)
    assert p.shape == (b0, b1)
    torch.testing.assert_close(p.sum(1), torch.full((b0,), 1 / b0, dtype=p.dtype), rtol=0, atol=1e-14)
    torch.testing.assert_close(p.sum(0), torch.full((b1,), 1 / b1, dtype=p.dtype), rtol=0, atol=1e-14)
    assert float((p * sq_cost(x0, x1)).sum()) == pytest.approx(optimum(x0, x1), rel=1e-12)
    assert torch.count_nonzero(p) <= b0 + b1 - 1, "an extreme-point plan"
    i, j = coupler.indices(x0, x1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(i, torch.arange(b0))
    assert bool((p[i, j] > 0).all()), "pairs come from the plan's support"
    i2, j2 = coupler.indices(x0, x1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(j, j2), "the generator makes the draw reproducible"


def test_exact_unequal_draw_follows_plan_rows():
    # one source, three targets: the plan row is (1/3, 1/3, 1/3); frequencies of the drawn target follow it
    x0, x1 = batches((1, 2), b1=3, seed=2)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([ExactOTCoupler().indices(x0, x1, generator=g)[1] for _ in range(600)])
    freq = torch.bincount(draws, minlength=3).double() / 600
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.07)


@pytest.mark.parametrize("x0, x1, weights1", [
    # one source, weighted targets: the plan row is weights1 itself
    ([[0.0, 0.0]], [[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]], (0.5, 0.3, 0.2)),
    # 1-D, uniform 2 x 3: the monotone plan is unique, rows (1/3, 1/6, 0) and (0, 1/6, 1/3)
    ([[0.0], [10.0]], [[0.0], [4.0], [10.0]], None),
], ids=["weighted-1x3", "uniform-2x3"])
def test_exact_unequal_draw_frequencies_follow_plan_masses(x0, x1, weights1):
    """Each source's drawn target follows P[i, :] / P[i, :].sum(), masses and not just support.

    Both plans have rows with unequal nonzero masses, so drawing uniformly among a row's nonzero entries
    is off by 1/6 (17 standard deviations or more at 3000 draws). Tolerance: 4 binomial standard
    deviations sqrt(p (1 - p) / n) per entry, a two-sided normal tail of 6e-5 each, so under 1e-3 over
    all entries for a correct sampler; entries of mass 0 must never be drawn.
    """
    x0, x1 = torch.tensor(x0, dtype=torch.float64), torch.tensor(x1, dtype=torch.float64)
    w1 = None if weights1 is None else torch.tensor(weights1, dtype=torch.float64)
    coupler, n = ExactOTCoupler(), 3000
    p = coupler.plan(x0, x1, weights1=w1)
    rows = p / p.sum(1, keepdim=True)
    assert any(len(set(r[r > 0].tolist())) > 1 for r in rows), "a row with unequal masses, else uniform passes"
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([coupler.indices(x0, x1, weights1=w1, generator=g)[1] for _ in range(n)])
    freq = torch.stack([torch.bincount(draws[:, k], minlength=x1.shape[0]) for k in range(x0.shape[0])]).double() / n
    assert bool((freq[rows == 0] == 0).all()), "zero-mass targets are never drawn"
    assert bool(((freq - rows).abs() <= 4 * (rows * (1 - rows) / n).sqrt()).all()), (freq, rows)


@pytest.mark.parametrize("backend", ["scipy", "multiscale"])
def test_permutation_backends_reject_unequal_sizes(backend):
    x0, x1 = batches((10, 2), b1=12)
    with pytest.raises(ValueError, match="equal batch sizes"):
        ExactOTCoupler(backend).indices(x0, x1)
    with pytest.raises(ValueError, match="backend"):
        ExactOTCoupler("lapjv")


# ---------------------------------------------------------------- sampling helper


def test_sample_rows_matches_softmax():
    logits = torch.tensor([[0.0, math.log(3.0), -math.inf], [2.0, 2.0, 2.0]]).repeat(5000, 1)
    j = sample_rows(logits, torch.Generator().manual_seed(0))
    first = torch.bincount(j[0::2], minlength=3).double() / 5000
    second = torch.bincount(j[1::2], minlength=3).double() / 5000
    assert first[2] == 0, "entries at -inf are never drawn"
    torch.testing.assert_close(first, torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64), rtol=0, atol=0.02)
    torch.testing.assert_close(second, torch.full((3,), 1 / 3, dtype=torch.float64), rtol=0, atol=0.02)


# ---------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("b0,b1", [(40, 40), (30, 45)])
def test_sinkhorn_marginals_within_tolerance(b0, b1):
    x0, x1 = batches((b0, 1, 3, 3), b1=b1, seed=4)
    coupler = SinkhornCoupler(epsilon=0.1, tol=1e-5, chunk_size=16)
    p = coupler.plan(x0, x1)
    assert float((p.sum(1) - 1 / b0).abs().sum()) <= 1e-5
    torch.testing.assert_close(p.sum(0), torch.full((b1,), 1 / b1, dtype=p.dtype), rtol=0, atol=1e-12)
    res = coupler.solve(x0, x1)
    assert res.converged and res.marginal_error <= 1e-5


def test_sinkhorn_chunking_does_not_change_the_potentials():
    x0, x1 = batches((33, 5), b1=29, seed=8)
    full = SinkhornCoupler(epsilon=0.05, tol=1e-6).solve(x0, x1)
    chunked = SinkhornCoupler(epsilon=0.05, tol=1e-6, chunk_size=8).solve(x0, x1)
    torch.testing.assert_close(full.f, chunked.f)
    torch.testing.assert_close(full.g, chunked.g)
    assert full.n_iters == chunked.n_iters


def test_sinkhorn_cost_decreases_to_the_exact_cost():
    x0, x1 = batches((48, 3), seed=9)
    opt = optimum(x0, x1)
    c = sq_cost(x0, x1)
    # measured relative gaps: 0.15, 0.030, 0.0063 (and 0.0010 at epsilon = 0.003, too slow for the suite)
    costs = [float((SinkhornCoupler(epsilon=e, tol=1e-4, max_iters=5000).plan(x0, x1) * c).sum())
             for e in (0.1, 0.03, 0.01)]
    assert all(a > b for a, b in zip(costs, costs[1:])), costs
    assert all(k >= opt * (1 - 1e-9) for k in costs), "an entropic plan never beats the exact optimum"
    assert costs[-1] - opt < 0.01 * opt
    assert costs[0] - opt > 10 * (costs[-1] - opt)


def test_sinkhorn_absolute_epsilon():
    x0, x1 = batches((20, 2), seed=1)
    rel = SinkhornCoupler(epsilon=0.05).solve(x0, x1)
    mean_cost = float(sq_cost(x0, x1).mean())
    assert rel.epsilon == pytest.approx(0.05 * mean_cost, rel=1e-10)
    ab = SinkhornCoupler(epsilon=0.05 * mean_cost, relative=False).solve(x0, x1)
    assert ab.epsilon == pytest.approx(rel.epsilon, rel=1e-12)
    torch.testing.assert_close(ab.g, rel.g)


def test_sinkhorn_float32_small_epsilon_is_finite_and_near_exact():
    # large costs (mean about 1.5e6) and epsilon 3e-3 of it: C / epsilon reaches hundreds, so exp(-C / epsilon)
    # underflows in float32 outside the log domain; measured: 72 iterations, cost gap 1.7e-4, 84 % exact pairs
    x0, x1 = batches((64, 1, 8, 8), seed=12, dtype=torch.float32, scale=100.0)
    coupler = SinkhornCoupler(epsilon=3e-3, tol=1e-2, max_iters=5000)
    res = coupler.solve(x0, x1)
    assert res.converged and torch.isfinite(res.f).all() and torch.isfinite(res.g).all()
    p = coupler.plan(x0, x1)
    assert p.dtype == torch.float32 and torch.isfinite(p).all()
    assert float((p.double() * sq_cost(x0, x1)).sum()) == pytest.approx(optimum(x0, x1), rel=1e-3)
    i, j = coupler.indices(x0, x1, generator=torch.Generator().manual_seed(0))
    exact_j = ExactOTCoupler().indices(x0, x1)[1]
    assert torch.equal(i, torch.arange(64))
    assert (j == exact_j).double().mean() > 0.75, "at small epsilon the draws mostly follow the exact permutation"


def test_sinkhorn_draws_are_reproducible_and_spread_at_large_epsilon():
    x0, x1 = batches((200, 2), seed=13)
    coupler = SinkhornCoupler(epsilon=100.0, chunk_size=32)  # nearly the product plan
    _, j = coupler.indices(x0, x1, generator=torch.Generator().manual_seed(1))
    _, j2 = coupler.indices(x0, x1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(j, j2)
    assert 0.5 < len(torch.unique(j)) / 200 < 0.75, "i.i.d. uniform draws cover about 1 - 1/e of the targets"


@pytest.mark.parametrize("epsilon, relative", [(0.1, True), (1.0, False)])
def test_sinkhorn_plan_matches_pot_entropic_solution(epsilon, relative):
    """The plan is the entropic OT solution for the squared Euclidean cost at the stated epsilon.

    Exact marginals alone do not pin it down: epsilon off by x1.25 (or the cost scaled by 0.8) keeps them
    but moves entries by 7e-3 to 1e-2 here. With both solvers converged far below that (row-marginal L1
    error <= 1e-10 here, stopThr=1e-12 for POT), the measured entrywise gap is 3e-11; atol 1e-8 leaves a
    300x margin for round-off and is still 5e5 times smaller than the x1.25 shift.
    """
    x0, x1 = batches((7, 3), b1=9, seed=21)
    c = sq_cost(x0, x1)
    eps_abs = epsilon * float(c.mean()) if relative else epsilon  # mean cost about 5.4: 0.54 and 1.0
    coupler = SinkhornCoupler(epsilon=epsilon, relative=relative, tol=1e-10, max_iters=10_000)
    res = coupler.solve(x0, x1)
    assert res.converged and res.epsilon == pytest.approx(eps_abs, rel=1e-12)
    p = coupler.plan(x0, x1)
    expected = ot.sinkhorn(np.full(7, 1 / 7), np.full(9, 1 / 9), c.numpy(), reg=eps_abs, method="sinkhorn_log",
                           stopThr=1e-12, numItermax=100_000)
    torch.testing.assert_close(p, torch.from_numpy(expected), rtol=0, atol=1e-8)


def test_sinkhorn_draw_frequencies_follow_plan_rows():
    """Source i's target is drawn with probability P[i, j] / P[i, :].sum().

    Three distinct sources, each repeated n = 4000 times (identical rows of P, so one call gives 4000 draws
    per row; chunk_size=1000 crosses 12 sampling chunks), four targets, absolute epsilon 1 so every row
    spreads over all targets (masses 0.01 to 0.67). Tolerance: 4 binomial standard deviations per entry,
    a two-sided normal tail of 6e-5 each, under 1e-3 over the 12 entries for a correct sampler; drawing
    from the scores scaled by 0.8 or 1.5 (a wrong temperature) is off by 8.8 and 19 standard deviations.
    """
    x0 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x1 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    n = 4000
    big0 = x0.repeat_interleave(n, 0)
    coupler = SinkhornCoupler(epsilon=1.0, relative=False, tol=1e-8, chunk_size=1000)
    p = coupler.plan(big0, x1).view(3, n, 4)
    torch.testing.assert_close(p, p[:, :1].expand_as(p), rtol=1e-12, atol=0)
    rows = p[:, 0] / p[:, 0].sum(1, keepdim=True)
    assert float(rows.min()) > 0.005 and float(rows.max()) < 0.7, "non-degenerate rows"
    i, j = coupler.indices(big0, x1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(i, torch.arange(3 * n))
    freq = torch.stack([torch.bincount(r, minlength=4) for r in j.view(3, n)]).double() / n
    assert bool(((freq - rows).abs() <= 4 * (rows * (1 - rows) / n).sqrt()).all()), (freq, rows)


def test_sinkhorn_warns_when_not_converged():
    x0, x1 = batches((20, 2), seed=1)
    with pytest.warns(RuntimeWarning, match="max_iters"):
        res = SinkhornCoupler(epsilon=1e-3, tol=1e-12, max_iters=3).solve(x0, x1)
    assert not res.converged and res.n_iters == 3


def test_sinkhorn_on_float32_points_near_1e20_gives_the_unit_scale_plan():
    """Squared norms of float32 points near 1e20 overflow; before centring and scaling the plan was all
    NaN and the draws all zero. The plan depends on the data only through C / (epsilon mean C): it must
    equal the plan of the same points at unit scale, and the draws with one seed must mostly agree."""
    x0, x1 = batches((64, 2), seed=12, dtype=torch.float32)
    big0, big1 = 1e20 * x0, 1e20 * x1
    ref = SinkhornCoupler().plan(x0, x1)
    p = SinkhornCoupler().plan(big0, big1)
    assert bool(torch.isfinite(p).all())
    torch.testing.assert_close(p, ref, rtol=0, atol=1e-6)  # entries about 1 / 64^2 = 2.4e-4
    _, j = SinkhornCoupler().indices(big0, big1, generator=torch.Generator().manual_seed(1))
    _, j_ref = SinkhornCoupler().indices(x0, x1, generator=torch.Generator().manual_seed(1))
    assert (j == j_ref).double().mean() > 0.9 and len(set(j.tolist())) > 20
    # potentials in cost units (about 1e40) exceed float32: refused, and exact in float64
    with pytest.raises(RuntimeError, match="overflow torch.float32"):
        SinkhornCoupler().solve(big0, big1)
    x0, x1 = x0.double(), x1.double()
    res, res_big = SinkhornCoupler().solve(x0, x1), SinkhornCoupler().solve(1e20 * x0, 1e20 * x1)
    torch.testing.assert_close(res_big.g / 1e40, res.g, rtol=1e-9, atol=1e-12)
    assert res_big.epsilon == pytest.approx(1e40 * res.epsilon, rel=1e-12)


def test_sinkhorn_raises_instead_of_returning_nan():
    """Anything still non-finite is an error saying what to change, never a NaN plan with a warning."""
    x0, x1 = batches((32, 2), seed=2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="NaN or infinite potentials.*raise epsilon, or pass float64"):
        SinkhornCoupler(epsilon=1e-40, max_iters=20).plan(x0, x1)
    with pytest.raises(ValueError, match="below what torch.float32 resolves"):
        SinkhornCoupler(epsilon=1e-3, relative=False).indices(1e20 * x0, 1e20 * x1)


# ---------------------------------------------------------------- independent


def test_independent_keeps_equal_batches_and_draws_uniformly_otherwise():
    x0, x1 = batches((10, 2), seed=0)
    i, j = IndependentCoupler().indices(x0, x1)
    assert torch.equal(i, torch.arange(10)) and torch.equal(j, torch.arange(10))
    x0, x1 = batches((3000, 2), b1=5, seed=0)
    i, j = IndependentCoupler().indices(x0, x1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(i, torch.arange(3000))
    freq = torch.bincount(j, minlength=5).double() / 3000
    torch.testing.assert_close(freq, torch.full((5,), 0.2, dtype=torch.float64), rtol=0, atol=0.03)
    p = IndependentCoupler().plan(x0, x1)
    assert p.shape == (3000, 5)
    torch.testing.assert_close(p, torch.full((3000, 5), 1 / 15000, dtype=p.dtype))


# ---------------------------------------------------------------- bad input

COUPLERS = [ExactOTCoupler("auto"), ExactOTCoupler("scipy"), ExactOTCoupler("multiscale"), ExactOTCoupler("pot"),
            SinkhornCoupler(), IndependentCoupler()]


@pytest.mark.parametrize("coupler", COUPLERS, ids=repr)
@pytest.mark.parametrize("method", ["indices", "plan", "pair"])
def test_bad_input_raises_value_error_naming_the_problem(coupler, method):
    call = getattr(coupler, method)
    x0, x1 = batches((8, 3), seed=0)
    bad = x0.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        call(bad, x1)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        call(x0, bad)
    with pytest.raises(ValueError, match="empty"):
        call(x0[:0], x1)
    with pytest.raises(ValueError, match="per-sample shape"):
        call(x0, x1[:, :2])
    with pytest.raises(ValueError, match="dtype"):
        call(x0, x1.float())
    with pytest.raises(ValueError, match="floating"):
        call(x0.long(), x1.long())


@pytest.mark.parametrize("kwargs", [{"epsilon": 0.0}, {"epsilon": float("nan")}, {"tol": -1.0},
                                    {"max_iters": 0}, {"chunk_size": 0}])
def test_sinkhorn_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SinkhornCoupler(**kwargs)


# ---------------------------------------------------------------- exact, weighted batches


def test_exact_weighted_plan_matches_pot_and_draws_follow_its_support():
    x0, x1 = batches((12, 3), b1=9, seed=7)
    g = torch.Generator().manual_seed(3)
    w0 = torch.rand(12, generator=g, dtype=torch.float64) + 0.1
    w1 = torch.rand(9, generator=g, dtype=torch.float64) + 0.1
    w0, w1 = w0 / w0.sum(), w1 / w1.sum()
    coupler = ExactOTCoupler()
    p = coupler.plan(x0, x1, weights0=w0, weights1=w1).double()
    torch.testing.assert_close(p.sum(1), w0, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.sum(0), w1, rtol=0, atol=1e-12)
    expected = ot.emd2(w0.numpy(), w1.numpy(), sq_cost(x0, x1).numpy(), numItermax=10**8)
    assert float((p * sq_cost(x0, x1)).sum()) == pytest.approx(expected, rel=1e-12)
    i, j = coupler.indices(x0, x1, weights0=w0, weights1=w1, generator=torch.Generator().manual_seed(0))
    assert bool((p[i, j] > 0).all())


@pytest.mark.parametrize("weights, match", [(torch.full((5,), 0.1), "sum to 1"), (torch.tensor([1.5, -0.5, 0, 0, 0]), "non-negative"),
                                            (torch.full((4,), 0.25), "shape")])
def test_exact_bad_weights_raise(weights, match):
    x0, x1 = batches((5, 2), seed=1)
    with pytest.raises(ValueError, match=match):
        ExactOTCoupler().plan(x0, x1, weights0=weights)


@pytest.mark.parametrize("backend", ["scipy", "multiscale"])
def test_permutation_backends_refuse_weights(backend):
    x0, x1 = batches((4, 2), seed=1)
    with pytest.raises(ValueError, match="uniform"):
        ExactOTCoupler(backend).plan(x0, x1, weights1=torch.full((4,), 0.25))
