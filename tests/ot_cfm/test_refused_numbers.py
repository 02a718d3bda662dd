"""Numbers that cannot be right are refused, not returned; the fixed-step sampler keeps only what it returns.

A log-likelihood of a field that detaches x, a Sinkhorn plan whose marginals are round-off, a Wasserstein
distance of NaN points; and the memory of a fixed-step solve, against torchdyn's ``odeint`` on the same input.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchdyn.numerics import odeint
from torchdyn.numerics.solvers.ode import str_to_solver

from ot_cfm.compat.torchcfm.optimal_transport import OTPlanSampler, wasserstein
from ot_cfm.couplers import sinkhorn
from ot_cfm.couplers.sinkhorn import SinkhornCoupler
from ot_cfm.solvers.likelihood import divergence, draw_probes, log_likelihood
from ot_cfm.solvers.ode import sample

F64 = torch.float64
DETACHED = "does not depend on x through autograd"


def half_x_closed_form(x):
    """v(t, x) = x / 2 in d dims: x(t) = x0 e^{t/2} and div v = d / 2, so log p1(x) = log N(x e^{-1/2}; 0, I) - d / 2."""
    z, d = x * math.exp(-0.5), x.shape[1]
    return -0.5 * z.square().sum(1) - 0.5 * d * math.log(2 * math.pi) - 0.5 * d


def standard_normal_log_prob(z):
    return -0.5 * z.square().sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def _no_grad_half(t, x):
    with torch.no_grad():
        return 0.5 * x


@pytest.mark.parametrize("field", [lambda t, x: 0.5 * x.detach(), lambda t, x: torch.from_numpy(0.5 * x.detach().numpy()),
                                   _no_grad_half], ids=["detach", "numpy", "no_grad"])
def test_log_likelihood_refuses_a_field_that_detaches_x(field):
    """Before: -1.8618 for x = (0.3, -0.2), one nat (d / 2) above the closed form -2.8618 (div v taken as 0)."""
    x = torch.tensor([[0.3, -0.2], [1.0, 2.0]], dtype=F64)
    exact = log_likelihood(lambda t, y: 0.5 * y, x, atol=1e-10, rtol=1e-10).log_likelihood
    torch.testing.assert_close(exact, half_x_closed_form(x), rtol=0, atol=1e-8)
    assert float(half_x_closed_form(x)[0]) == pytest.approx(-2.8618, abs=1e-4)
    with pytest.raises(ValueError, match=DETACHED):
        log_likelihood(field, x)
    with pytest.raises(ValueError, match=DETACHED):  # Hutchinson's estimate as well
        divergence(field, 0.0, x, probes=draw_probes(x, 2, generator=torch.Generator().manual_seed(0)))


def test_log_likelihood_refuses_a_network_of_a_detached_x():
    """The output requires grad (the weights) but not through x. Before: autograd's own RuntimeError."""
    net = torch.nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match=DETACHED):
        log_likelihood(lambda t, y: net(y.detach()), torch.zeros(3, 2, dtype=F64))


def test_fields_constant_in_x_keep_divergence_zero():
    """v = b(t), constant in x: log p1(x) = log N(x - int_0^1 b dt). A constant built from a parameter used to
    raise autograd's RuntimeError ("appears to not have been used in the graph"); t * 1 integrates to 1/2, which
    the midpoint rule does exactly."""
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    bias = torch.nn.Parameter(torch.tensor([0.5, -1.0], dtype=F64))
    for field, shift in ((lambda t, y: torch.ones_like(y), torch.ones(2, dtype=F64)),
                         (lambda t, y: bias.expand_as(y), bias.detach()),
                         (lambda t, y: t * torch.ones_like(y), torch.full((2,), 0.5, dtype=F64))):
        res = log_likelihood(field, x, solver="midpoint", steps=4)
        torch.testing.assert_close(res.log_likelihood, standard_normal_log_prob(x - shift), rtol=0, atol=1e-12)
        assert torch.equal(res.delta, torch.zeros(6, dtype=F64))


def points(b=64, d=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g).to(dtype), (torch.randn(b, d, generator=g) * 0.7 + 1.0).to(dtype)


def marginal_errors(plan):
    p = plan.double()
    return float((p.sum(1) - 1 / p.shape[0]).abs().sum()), float((p.sum(0) - 1 / p.shape[1]).abs().sum())


@pytest.mark.parametrize("epsilon, relative, dtype", [(1e-9, True, torch.float32), (1e-30, False, torch.float32),
                                                      (1e-30, False, F64)])
def test_sinkhorn_refuses_a_plan_that_is_not_a_coupling(epsilon, relative, dtype):
    """Before: plan() returned an infinite total mass, with only a RuntimeWarning at relative 1e-9 (float32) and
    with none at 1e-30 absolute, where solve() reported converged with marginal error 0; indices() drew from
    it. Now every use of the plan raises."""
    x0, x1 = points(dtype=dtype)
    coupler = SinkhornCoupler(epsilon, relative=relative)
    for use in (coupler.plan, coupler.indices, coupler.solve):
        with pytest.raises(RuntimeError, match=rf"not a coupling: its marginals miss by .* epsilon {epsilon:g} .*{dtype}"
                                               r".*raise epsilon, pass float64.*anneal_from.*ExactOTCoupler"):
            use(x0, x1)


def test_sinkhorn_plans_that_pass_the_certificate_meet_their_marginals():
    """The certified plan's marginals, summed here in float64: within tol + COUPLING_TOL (rows) and COUPLING_TOL
    (columns), float32, down to relative epsilon 1e-5 by annealing; its draws follow its rows."""
    x0, x1 = points()
    for coupler in (SinkhornCoupler(), SinkhornCoupler(1e-5, anneal_from=1.0, max_iters=10_000)):
        rows, cols = marginal_errors(coupler.plan(x0, x1))
        assert rows <= coupler.tol + sinkhorn.COUPLING_TOL and cols <= sinkhorn.COUPLING_TOL, (rows, cols)
    rows, cols = marginal_errors(SinkhornCoupler(tol=1e-6).plan(x0.double(), x1.double()))
    assert rows <= 1e-6 and cols <= 1e-12


def test_sinkhorn_assignment_is_not_certified_by_the_plan():
    """hard=True uses g only to start the auction's prices, which certifies itself: at an epsilon whose plan is
    refused the assignment is still a permutation within assign_tol (relative) of scipy's optimum."""
    x0, x1 = points()
    coupler = SinkhornCoupler(1e-30, relative=False, hard=True)
    j = coupler.assignment(x0, x1)
    cost = torch.cdist(x0.double(), x1.double()).square()
    r, c = linear_sum_assignment(cost.numpy())
    assert sorted(j.tolist()) == list(range(64))
    assert float(cost[torch.arange(64), j].mean()) <= cost.numpy()[r, c].mean() + 1e-3 * float(cost.mean()) + 1e-6


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_compat_wasserstein_refuses_non_finite_points_as_the_plan_sampler_does(bad):
    """Before: wasserstein returned 0.0 for NaN points (POT's 'Problem unbounded'), while OTPlanSampler refused them."""
    x0, x1 = points(8, dtype=F64)
    x0_bad, x1_bad = x0.clone(), x1.clone()
    x0_bad[3, 1], x1_bad[5, 0] = bad, bad
    for method in (None, "sinkhorn"):
        with pytest.raises(ValueError, match=r"x0 contains NaN or inf \(first bad rows: \[3\]\)"):
            wasserstein(x0_bad, x1, method=method)
        with pytest.raises(ValueError, match=r"x1 contains NaN or inf \(first bad rows: \[5\]\)"):
            wasserstein(x0, x1_bad, method=method)
    with pytest.raises(ValueError, match=r"x0 contains NaN or inf \(first bad rows: \[3\]\)"):
        OTPlanSampler("exact").sample_plan(x0_bad, x1)


def tiny_field(t, x):
    return torch.tanh(x * (1 + t)) - 0.3 * x


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
def test_fixed_step_sampler_equals_torchdyn_odeint_bit_for_bit(solver):
    """The same states as torchdyn's odeint on the same linspace grid (the sampler's former path), forward and
    reversed, float32 and float64, at a few NFE, and the same trajectory."""
    for dtype in (torch.float32, F64):
        x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
        for steps in (1, 3, 10, 37):
            for span in ((0.0, 1.0), (1.0, 0.0), (0.1, 0.95)):
                grid = torch.linspace(*span, steps + 1, dtype=dtype)
                _, states = odeint(tiny_field, x0, grid, str_to_solver(solver, dtype))
                out = sample(tiny_field, x0, solver=solver, steps=steps, t_span=span)
                kept = sample(tiny_field, x0, solver=solver, steps=steps, t_span=span, return_trajectory=True)
                assert torch.equal(out.x, states[-1]) and torch.equal(kept.trajectory, states)


def test_reversed_span_reports_its_own_times():
    """Before: t_span = (1, 0) reported times -1 .. 0 (odeint integrates the negated time), fixed and adaptive."""
    x0 = torch.randn(4, 2, dtype=F64)
    for kwargs in (dict(solver="euler", steps=4), dict(solver="dopri5", trajectory_points=5)):
        out = sample(tiny_field, x0, t_span=(1.0, 0.0), return_trajectory=True, **kwargs)
        assert torch.equal(out.times, torch.linspace(1.0, 0.0, 5, dtype=F64))


def states_alive_at_most(solver, steps, **kwargs):
    """The most states handed to the field that were alive at once (weak references, checked every 10 calls)."""
    seen, most = [], 0

    def field(t, x):
        nonlocal most
        seen.append(weakref.ref(x))
        if len(seen) % 10 == 0:
            most = max(most, sum(r() is not None for r in seen))
        return tiny_field(t, x)

    out = sample(field, torch.randn(4, 2), solver=solver, steps=steps, **kwargs)
    return most, out


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_fixed_step_sampler_keeps_only_what_it_returns(solver):
    """Without a trajectory at most three states live at once (the caller's x0, the current state and the
    midpoint's stage), the same at 100 and 2000 steps: memory does not
    grow with steps. Before: every state was kept (about 100 and 2000 alive; 10^9 steps were killed at 23 GB).
    With the trajectory all steps + 1 are kept, as asked."""
    few, _ = states_alive_at_most(solver, 100)
    many, _ = states_alive_at_most(solver, 2000)
    assert few == many <= 3, (few, many)
    kept, out = states_alive_at_most(solver, 200, return_trajectory=True)
    assert kept >= 200 and out.trajectory.shape == (201, 4, 2)


def test_fixed_step_sampler_refuses_more_than_max_fixed_steps_at_once():
    """Before: 10^9 steps allocated a 4 GB grid and every state until the process was killed."""
    from ot_cfm.solvers.ode import MAX_FIXED_STEPS  # here: its absence must fail this test, not hang it

    calls = []
    for steps in (MAX_FIXED_STEPS + 1, 10**9):
        with pytest.raises(ValueError, match=f"steps = {steps} exceeds MAX_FIXED_STEPS = 1,000,000"):
            sample(lambda t, x: calls.append(t) or x, torch.zeros(1, 1), solver="euler", steps=steps)
    assert not calls
