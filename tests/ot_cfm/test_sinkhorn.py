"""Sinkhorn at scale: large-B marginals, epsilon scaling, the hard assignment and the sharpness measure.

References on the same points: POT (emd2, sinkhorn_log), scipy (linear_sum_assignment, entropy) and
closed-form bounds. The basic Sinkhorn tests (POT's plan, chunking, float32, bad input) are in
test_couplers.py.
"""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import entropy

from ot_cfm.couplers.sinkhorn import SinkhornCoupler


def batches(b, d, seed=0, dtype=torch.float64, b1=None):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, d, generator=g, dtype=dtype)
    x1 = torch.randn(b1 or b, d, generator=g, dtype=dtype) * 0.7 + 1.0
    return x0, x1


def sq_cost(x0, x1):
    return torch.cdist(x0.double(), x1.double()).pow(2)


def optimum(x0, x1):
    c = sq_cost(x0, x1).numpy()
    return ot.emd2(np.full(c.shape[0], 1 / c.shape[0]), np.full(c.shape[1], 1 / c.shape[1]), c, numItermax=10**9)


def test_large_batch_marginals_within_tolerance_in_small_blocks():
    """B = 4096, d = 2, float32, blocks of 256 rows: the marginals of the returned potentials, recomputed
    here in float64 with torch.logsumexp over the full rows and columns, meet the tolerance."""
    x0, x1 = batches(4096, 2, seed=3, dtype=torch.float32)
    tol = 1e-3
    res = SinkhornCoupler(epsilon=0.2, tol=tol, chunk_size=256).solve(x0, x1)
    assert res.converged and res.marginal_error <= tol
    f, g, eps, n = res.f.double(), res.g.double(), res.epsilon, 4096
    rows, cols = [], torch.full((n,), -math.inf, dtype=torch.float64)
    for s in range(0, n, 1024):
        logp = (f[s:s + 1024, None] + g[None, :] - sq_cost(x0[s:s + 1024], x1)) / eps - 2 * math.log(n)
        rows.append(torch.logsumexp(logp, 1).exp())
        cols = torch.logaddexp(cols, torch.logsumexp(logp, 0))
    row_error = float((torch.cat(rows) - 1 / n).abs().sum())
    col_error = float((cols.exp() - 1 / n).abs().sum())
    # float32 potentials (about 10 in cost units, eps about 0.8): round-off of 1e-6 relative per entry
    assert row_error <= tol * 1.01 and col_error <= 1e-3, (row_error, col_error)
    assert res.marginal_error == pytest.approx(row_error, rel=0.05, abs=1e-5)


def test_cost_decreases_to_the_exact_cost_within_the_entropic_bound():
    """<P_eps, C> falls monotonically to OT (POT emd2, and scipy's permutation) as epsilon shrinks.

    P_eps minimises <P, C> - eps H(P) over plans with the marginals, so <P_eps, C> - OT <= eps (H(P_eps) - H(P*))
    <= eps (H(P_eps) - log B), with H(P_eps) = sharpness * log(B^2) from the result: a bound from the reported
    numbers alone. Row marginals off by tol (L1) move <P, C> by at most tol * max C, the slack allowed."""
    x0, x1 = batches(48, 2, seed=9)
    opt = optimum(x0, x1)
    c = sq_cost(x0, x1).numpy()
    r, s = linear_sum_assignment(c)
    assert opt == pytest.approx(c[r, s].mean(), rel=1e-12)
    tol = 1e-4
    slack = tol * c.max()
    results = [SinkhornCoupler(epsilon=e, tol=tol, max_iters=100_000, anneal_from=1.0 if e < 1.0 else None).solve(x0, x1)
               for e in (1.0, 0.1, 0.03, 0.01, 0.002)]
    costs = [r.cost for r in results]
    assert all(a > b for a, b in zip(costs, costs[1:])), costs
    for res in results:
        bound = res.epsilon * (res.sharpness * math.log(48 * 48) - math.log(48))
        assert opt - slack <= res.cost <= opt + bound + slack, (res.cost, opt, bound)
    # measured relative gaps: 0.69, 0.13, 0.033, 0.0076, 0.0010
    assert costs[-1] - opt < 2e-3 * opt
    assert costs[0] - opt > 100 * (costs[-1] - opt)


def test_annealing_reaches_the_plan_of_a_cold_start_and_of_pot():
    x0, x1 = batches(40, 2, seed=21, b1=36)
    c = sq_cost(x0, x1)
    cold = SinkhornCoupler(epsilon=0.01, tol=1e-10, max_iters=100_000)
    warm = SinkhornCoupler(epsilon=0.01, tol=1e-10, max_iters=100_000, anneal_from=1.0)
    res_cold, res_warm = cold.solve(x0, x1), warm.solve(x0, x1)
    assert res_warm.converged and res_warm.epsilon == pytest.approx(res_cold.epsilon, rel=1e-12)
    p_cold, p_warm = (torch.exp((r.f[:, None] + r.g[None, :] - c) / r.epsilon) / (40 * 36) for r in (res_cold, res_warm))
    pot = ot.sinkhorn(np.full(40, 1 / 40), np.full(36, 1 / 36), c.numpy(), reg=res_cold.epsilon, method="sinkhorn_log",
                      stopThr=1e-13, numItermax=1_000_000)
    torch.testing.assert_close(p_warm, torch.from_numpy(pot), rtol=0, atol=1e-9)
    torch.testing.assert_close(p_warm, p_cold, rtol=0, atol=1e-9)
    assert res_warm.n_iters < res_cold.n_iters  # measured 565 against 687: at tol 1e-10 the last stage dominates


def test_annealing_saves_iterations_at_the_default_tolerance():
    """Warm starts carry the potentials from stage to stage; measured at B = 256, eps = 0.01: 88 iterations
    over all stages against 208 from a cold start (and 178 against 711 at eps = 0.003). Restarting each
    stage from zero potentials would cost more than one cold start."""
    x0, x1 = batches(256, 2, seed=3)
    cold = SinkhornCoupler(epsilon=0.01, max_iters=100_000).solve(x0, x1)
    warm = SinkhornCoupler(epsilon=0.01, max_iters=100_000, anneal_from=1.0).solve(x0, x1)
    assert cold.converged and warm.converged and warm.marginal_error <= 1e-3
    assert warm.n_iters < 0.6 * cold.n_iters, (warm.n_iters, cold.n_iters)
    assert warm.cost == pytest.approx(cold.cost, rel=1e-3)


def test_annealing_schedule_and_iteration_budget():
    x0, x1 = batches(30, 2, seed=2)
    coupler = SinkhornCoupler(epsilon=0.01, anneal_from=1.0, anneal_factor=0.25)
    unit = 0.5
    assert coupler._schedule(unit) == pytest.approx([0.5, 0.125, 0.03125, 0.0078125, 0.005])
    with pytest.warns(RuntimeWarning, match="max_iters=5"):
        res = SinkhornCoupler(epsilon=0.001, anneal_from=1.0, max_iters=5, tol=1e-12).solve(x0, x1)
    assert not res.converged and res.n_iters == 5


@pytest.mark.parametrize("d, dtype", [(2, torch.float64), (16, torch.float64), (2, torch.float32)])
def test_hard_assignment_is_a_permutation_within_the_stated_bound(d, dtype):
    """mean C(i, j_i) - optimal mean <= delta (delta-complementary slackness), against scipy on the same points."""
    b = 200
    x0, x1 = batches(b, d, seed=5, dtype=dtype)
    c = sq_cost(x0, x1).numpy()
    r, s = linear_sum_assignment(c)
    opt, mean = c[r, s].mean(), c.mean()
    for delta in (1e-2, 1e-3):
        j = SinkhornCoupler(epsilon=0.05, assign_tol=delta).assignment(x0, x1)
        assert j.dtype == torch.long and torch.equal(torch.sort(j).values, torch.arange(b)), "a permutation"
        gap = c[np.arange(b), j.numpy()].mean() - opt
        assert -1e-9 <= gap <= delta * mean * (1 + 1e-5), (gap, delta * mean)
    # the bound is not vacuous: the pairing as drawn and the row-wise best are further off
    assert c[np.arange(b), np.arange(b)].mean() - opt > 10 * 1e-3 * mean
    assert len(set(c.argmin(1).tolist())) < b


def test_hard_coupler_pairs_every_point_once_and_rejects_unequal_batches():
    x0, x1 = batches(64, 3, seed=7)
    coupler = SinkhornCoupler(epsilon=0.02, hard=True, assign_tol=1e-4)
    i, j = coupler.indices(x0, x1)
    assert torch.equal(i, torch.arange(64)) and torch.equal(j, coupler.assignment(x0, x1))
    a, b = coupler.pair(x0, x1)
    assert torch.equal(torch.sort(b, 0).values, torch.sort(x1, 0).values)
    c = sq_cost(x0, x1).numpy()
    r, s = linear_sum_assignment(c)
    assert float(((a - b) ** 2).sum(1).mean()) <= c[r, s].mean() + 1e-4 * c.mean()
    with pytest.raises(ValueError, match="batch size"):
        coupler.indices(x0, x1[:60])
    with pytest.raises(ValueError, match="equal batch sizes"):
        SinkhornCoupler().assignment(x0, x1[:60])


def test_assignment_terminates_on_ties():
    """Identical sources: every permutation is optimal, and equal bids must still settle."""
    x0 = torch.zeros(50, 2, dtype=torch.float64)
    x1 = batches(50, 2, seed=1)[1]
    j = SinkhornCoupler(epsilon=0.05).assignment(x0, x1)
    assert torch.equal(torch.sort(j).values, torch.arange(50))
    one = SinkhornCoupler().assignment(x0[:1], x1[:1])
    assert torch.equal(one, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="raise assign_tol"):
        SinkhornCoupler(assign_tol=1e-17).assignment(x0, x1)


def test_sharpness_and_cost_match_the_materialised_plan():
    """Blockwise <P, C> and H(P) / log(B0 B1) against the full plan, with scipy's entropy."""
    x0, x1 = batches(70, 3, seed=4, b1=50)
    coupler = SinkhornCoupler(epsilon=0.05, tol=1e-10, chunk_size=8, max_iters=10_000)
    res = coupler.solve(x0, x1)
    p = coupler.plan(x0, x1)
    assert res.cost == pytest.approx(float((p * sq_cost(x0, x1)).sum()), rel=1e-10)
    assert res.sharpness == pytest.approx(entropy(p.numpy().ravel()) / math.log(70 * 50), rel=1e-10)


def test_sharpness_is_one_for_the_product_plan_and_falls_to_the_permutation_value():
    x0, x1 = batches(48, 2, seed=9)
    assert SinkhornCoupler(epsilon=1e4).solve(x0, x1).sharpness == pytest.approx(1.0, abs=1e-9)
    assert SinkhornCoupler(epsilon=1e4).solve(*batches(48, 2, seed=9, b1=30)).sharpness == pytest.approx(1.0, abs=1e-9)
    values = [SinkhornCoupler(epsilon=e, tol=1e-4, max_iters=100_000, anneal_from=1.0).solve(x0, x1).sharpness
              for e in (0.3, 0.1, 0.01, 0.001)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] >= 0.5 - 1e-4, "no plan with uniform marginals has entropy below log B"
    assert values[-1] < 0.55, values  # measured: 0.95, 0.86, 0.65, 0.54 (log B / log B^2 = 1/2)


@pytest.mark.parametrize("kwargs, name", [({"anneal_from": 0.01}, "anneal_from"), ({"anneal_from": math.inf}, "anneal_from"),
                                          ({"anneal_from": 1.0, "anneal_factor": 1.0}, "anneal_factor"),
                                          ({"anneal_factor": 0.0}, "anneal_factor"), ({"assign_tol": 0.0}, "assign_tol")])
def test_rejects_bad_schedule_and_assignment_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SinkhornCoupler(epsilon=0.05, **kwargs)
