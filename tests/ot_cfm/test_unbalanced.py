"""Unbalanced and partial couplers: mass on outliers, POT's and torchcfm's plans on the same input, invariances,
the draws from a plan, bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch
from torchcfm.optimal_transport import OTPlanSampler

from ot_cfm.couplers import ExactOTCoupler
from ot_cfm.couplers.unbalanced import PartialCoupler, UnbalancedCoupler, sample_pairs

B, OUTLIERS = 64, 8


def batches_with_outliers(seed=0):
    """x0: B points of N(0, I_2); x1: B - 8 inliers of N(0, I_2) and 8 outliers near (15, 15) (the last rows)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 2, generator=g, dtype=torch.float64)
    inliers = torch.randn(B - OUTLIERS, 2, generator=g, dtype=torch.float64)
    outliers = torch.tensor([15.0, 15.0], dtype=torch.float64) + 0.5 * torch.randn(OUTLIERS, 2, generator=g,
                                                                                   dtype=torch.float64)
    return x0, torch.cat([inliers, outliers])


def raw_cost(x0, x1):
    return ot.dist(x0.double().numpy(), x1.double().numpy())


@pytest.mark.parametrize("coupler", [UnbalancedCoupler(), UnbalancedCoupler(reg_m=0.1), PartialCoupler(mass=1 - OUTLIERS / B),
                                     PartialCoupler(mass=1 - OUTLIERS / B, epsilon=0.05)], ids=repr)
def test_outliers_receive_less_mass_than_inliers_and_than_the_balanced_plan_gives(coupler):
    """The balanced plan gives every target 1/B (here: exact OT). With mass allowed to drop, each outlier column
    gets under a hundredth of that and of the smallest inlier column; the exact partial plan moving 56/64 of the
    mass gives the outliers none and every inlier its full 1/B. Pairs drawn from the plan almost never hold an
    outlier, against 8 in 64 for the balanced coupling."""
    x0, x1 = batches_with_outliers()
    balanced = ExactOTCoupler().plan(x0, x1).sum(0)
    torch.testing.assert_close(balanced, torch.full((B,), 1 / B, dtype=torch.float64))
    res = coupler.solve(x0, x1)
    columns = res.plan.sum(0)
    inlier, outlier = columns[: B - OUTLIERS], columns[B - OUTLIERS:]
    assert outlier.max() < inlier.min() / 100 and outlier.max() < balanced[0] / 100
    if isinstance(coupler, PartialCoupler):
        assert res.mass == pytest.approx(1 - OUTLIERS / B, rel=1e-9)
    if isinstance(coupler, PartialCoupler) and coupler.epsilon is None:
        assert float(outlier.max()) == 0.0
        torch.testing.assert_close(inlier, torch.full_like(inlier, 1 / B), rtol=0, atol=1e-15)
    g = torch.Generator().manual_seed(1)
    drawn = torch.cat([coupler.indices(x0, x1, generator=g)[1] for _ in range(10)])
    assert (drawn >= B - OUTLIERS).float().mean() < 0.01


def test_unbalanced_plan_equals_pots_and_torchcfms():
    """normalize="mean": POT's sinkhorn_unbalanced on the raw costs divided by their mean; normalize="max": torchcfm's
    OTPlanSampler("unbalanced", normalize_cost=True).get_map; normalize=None: its default (absolute reg, reg_m).
    Same iterations on costs that differ by rounding only."""
    x0, x1 = batches_with_outliers()
    cost = raw_cost(x0, x1)
    expected = ot.unbalanced.sinkhorn_unbalanced(ot.unif(B), ot.unif(B), cost / cost.mean(), 0.05, 1.0)
    res = UnbalancedCoupler(0.05, 1.0).solve(x0, x1)
    np.testing.assert_allclose(res.plan.numpy(), expected, rtol=0, atol=1e-12 * expected.max())
    assert res.unit == pytest.approx(cost.mean(), rel=1e-12) and res.mass == pytest.approx(expected.sum(), rel=1e-12)
    torchcfm_plan = OTPlanSampler("unbalanced", reg=0.05, reg_m=1.0, normalize_cost=True).get_map(x0, x1)
    ours = UnbalancedCoupler(0.05, 1.0, normalize="max").solve(x0, x1).plan.numpy()
    np.testing.assert_allclose(ours, torchcfm_plan, rtol=0, atol=1e-12 * torchcfm_plan.max())
    inliers = x1[: B - OUTLIERS]  # absolute units: reg 0.5 on unit-scale costs (the outliers' would underflow)
    torchcfm_plan = OTPlanSampler("unbalanced", reg=0.5, reg_m=2.0).get_map(x0, inliers)
    ours = UnbalancedCoupler(0.5, 2.0, normalize=None).solve(x0, inliers).plan.numpy()
    np.testing.assert_allclose(ours, torchcfm_plan, rtol=0, atol=1e-12 * torchcfm_plan.max())


def test_partial_plans_equal_pots_and_torchcfms():
    """Exact: POT's partial_wasserstein on the raw costs (the LP optimum is unique for points in general position);
    entropic with mass 1: torchcfm's OTPlanSampler("partial", normalize_cost=True), which always runs POT's 1000
    iterations: to rounding with as many, and to 1e-4 of the largest entry with ours stopped at a change of 1e-9."""
    x0, x1 = batches_with_outliers(seed=2)
    expected = ot.partial.partial_wasserstein(ot.unif(B), ot.unif(B), raw_cost(x0, x1), m=0.75)
    np.testing.assert_allclose(PartialCoupler(0.75).solve(x0, x1).plan.numpy(), expected, rtol=0, atol=1e-15)
    torchcfm_plan = OTPlanSampler("partial", reg=0.05, normalize_cost=True).get_map(x0, x1)
    with pytest.warns(RuntimeWarning, match="max_iters=1000"):
        ours = PartialCoupler(1.0, epsilon=0.05, normalize="max", tol=1e-300).solve(x0, x1).plan.numpy()
    np.testing.assert_allclose(ours, torchcfm_plan, rtol=0, atol=1e-12 * torchcfm_plan.max())
    ours = PartialCoupler(1.0, epsilon=0.05, normalize="max").solve(x0, x1).plan.numpy()
    np.testing.assert_allclose(ours, torchcfm_plan, rtol=0, atol=1e-4 * torchcfm_plan.max())


@pytest.mark.parametrize("coupler", [UnbalancedCoupler(), UnbalancedCoupler(normalize="max"), PartialCoupler(0.8),
                                     PartialCoupler(0.8, epsilon=0.1)], ids=repr)
def test_plans_are_invariant_to_a_common_translation_and_scaling(coupler):
    """Relative units ("mean", "max") and the exact partial LP: (c + s x0, c + s x1) has the plan of (x0, x1)."""
    x0, x1 = batches_with_outliers(seed=3)
    plan = coupler.solve(x0, x1).plan
    moved = coupler.solve(1e3 + 37.0 * x0, 1e3 + 37.0 * x1).plan
    torch.testing.assert_close(moved, plan, rtol=1e-7, atol=1e-12 * float(plan.max()))


def test_absolute_units_scale_with_the_data():
    """normalize=None reads epsilon and reg_m in units of |x0 - x1|^2: the plan of (s x0, s x1) with s^2 epsilon and
    s^2 reg_m is the plan of (x0, x1), while the same epsilon and reg_m on s x0, s x1 give another plan."""
    x0, x1 = batches_with_outliers(seed=4)
    x1 = x1[: B - OUTLIERS]
    plan = UnbalancedCoupler(0.5, 2.0, normalize=None).solve(x0, x1).plan
    torch.testing.assert_close(UnbalancedCoupler(0.5 * 9, 2.0 * 9, normalize=None).solve(3 * x0, 3 * x1).plan, plan,
                               rtol=1e-7, atol=1e-12 * float(plan.max()))
    other = UnbalancedCoupler(0.5, 2.0, normalize=None).solve(3 * x0, 3 * x1).plan
    assert (other - plan).abs().max() > 0.1 * plan.max()


def test_plan_is_normalised_and_in_the_inputs_dtype():
    x0, x1 = batches_with_outliers(seed=5)
    for coupler in (UnbalancedCoupler(), PartialCoupler(0.5)):
        p = coupler.plan(x0.float(), x1.float())
        assert p.dtype == torch.float32 and p.shape == (B, B)
        assert float(p.sum()) == pytest.approx(1.0, rel=1e-6)


def test_sample_pairs_frequencies_follow_the_plan_and_the_generator():
    """100,000 pairs from a 3 x 4 plan of total mass 0.6: each (i, j) with frequency P_ij / 0.6 within 5 binomial
    standard errors; a zero entry is never drawn; same seed, same pairs; the global generator is untouched."""
    plan = torch.tensor([[0.10, 0.00, 0.05, 0.05], [0.02, 0.08, 0.10, 0.00], [0.00, 0.00, 0.05, 0.15]],
                        dtype=torch.float64)
    n = 100_000
    state = torch.get_rng_state()
    i, j = sample_pairs(plan, n, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    counts = torch.zeros(3, 4, dtype=torch.float64).index_put_((i, j), torch.ones(n, dtype=torch.float64),
                                                                accumulate=True)
    p = plan / plan.sum()
    se = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() <= 5 * se + 1e-12).all(), counts / n - p
    assert counts[plan == 0].sum() == 0
    i2, j2 = sample_pairs(plan, n, torch.Generator().manual_seed(0))
    assert torch.equal(i, i2) and torch.equal(j, j2)
    assert not torch.equal(j, sample_pairs(plan, n, torch.Generator().manual_seed(1))[1])


def test_pair_carries_labels_and_indices_are_seeded():
    x0, x1 = batches_with_outliers(seed=6)
    y0, y1 = torch.arange(B), torch.arange(B) + 100
    coupler = UnbalancedCoupler()
    a0, a1, b0, b1 = coupler.pair(x0, x1, y0, y1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a0, x0[b0]) and torch.equal(a1, x1[b1 - 100])
    first = coupler.indices(x0, x1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first[0], b0) and torch.equal(first[1], b1 - 100)


def test_failures_raise_instead_of_returning_a_fallback_plan():
    """Absolute epsilon 0.5 with outliers at squared distance ~450: exp(-C / eps) underflows to zero columns;
    POT warns and returns its previous scalings (torchcfm then uses that plan), ours raises. Too few iterations warn."""
    x0, x1 = batches_with_outliers()
    with pytest.raises(RuntimeError, match="raise epsilon"):
        UnbalancedCoupler(0.5, 1.0, normalize=None).solve(x0, x1)
    with pytest.raises(RuntimeError, match="raise epsilon"):
        PartialCoupler(0.875, epsilon=0.001).solve(x0, x1)
    with pytest.warns(RuntimeWarning, match="max_iters=2"):
        UnbalancedCoupler(max_iters=2).solve(x0, x1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UnbalancedCoupler().solve(x0, x1)


@pytest.mark.parametrize("make, message", [
    (lambda: UnbalancedCoupler(epsilon=0.0), "epsilon must be a finite number > 0"),
    (lambda: UnbalancedCoupler(reg_m=-1.0), "reg_m must be a number > 0"),
    (lambda: UnbalancedCoupler(normalize="median"), "normalize must be one of"),
    (lambda: UnbalancedCoupler(method="lbfgs"), "method must be one of"),
    (lambda: UnbalancedCoupler(max_iters=0), "max_iters must be a positive integer"),
    (lambda: PartialCoupler(mass=1.5), r"in \(0, 1\]"),
    (lambda: PartialCoupler(mass=math.nan), "mass must be"),
    (lambda: PartialCoupler(epsilon=-0.1), "epsilon must be"),
])
def test_bad_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_batches_and_plans_raise():
    with pytest.raises(ValueError, match="per-sample shape"):
        UnbalancedCoupler().solve(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="non-negative"):
        sample_pairs(torch.tensor([[0.5, -0.1]]), 3)
    with pytest.raises(ValueError, match="num_pairs"):
        sample_pairs(torch.ones(2, 2), 0)
