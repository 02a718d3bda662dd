"""Probability paths: closed forms (end points, sigma_t, the flow as the time derivative of x_t, the score as
the gradient of the Gaussian log-density), and torchcfm's matchers on the same inputs and seeds."""

import math

import pytest
import torch
from torchcfm import conditional_flow_matching as tcfm

from ot_cfm.matcher import (
    ConditionalFlowMatcher,
    SchrodingerBridgeConditionalFlowMatcher,
    TargetConditionalFlowMatcher,
    VariancePreservingConditionalFlowMatcher,
)
from ot_cfm.paths import PATHS, BrownianBridgePath, StraightPath, TargetPath, VariancePreservingPath

ALL_PATHS = [StraightPath(0.0), StraightPath(0.3), BrownianBridgePath(0.7), TargetPath(0.0), TargetPath(0.1),
             VariancePreservingPath(0.0), VariancePreservingPath(0.2)]


def batch(shape=(16, 3), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype) + 2,
            torch.randn(shape, generator=g, dtype=dtype))


@pytest.mark.parametrize("path", ALL_PATHS, ids=repr)
def test_flow_is_the_time_derivative_of_x_t_for_a_fixed_eps(path):
    """u_t(x0, x1, t, x_t) = d/dt (mu_t + sigma_t eps) at every t in (0, 1): the conditional flow generates the
    path. The derivative is taken by autograd through mu_t and sigma_t, not through u_t's formula."""
    x0, x1, eps = batch()
    t = torch.linspace(0.02, 0.98, 16, dtype=torch.float64)

    def x_of_t(tt):
        return path.sample_xt(x0, x1, tt, eps)

    x_t, dx_dt = torch.func.jvp(x_of_t, (t,), (torch.ones_like(t),))
    torch.testing.assert_close(path.u_t(x0, x1, t, x_t), dx_dt, rtol=1e-9, atol=1e-9)


def test_closed_forms_at_the_end_points_and_the_middle():
    x0, x1, eps = batch()
    zeros, ones, half = (torch.full((16,), v, dtype=torch.float64) for v in (0.0, 1.0, 0.5))
    for path in (StraightPath(0.0), BrownianBridgePath(0.7), VariancePreservingPath(0.0)):
        torch.testing.assert_close(path.sample_xt(x0, x1, zeros, eps), x0)   # sigma_0 = 0 on these three
        torch.testing.assert_close(path.sample_xt(x0, x1, ones, eps), x1)
    # the Brownian bridge: sigma_t = sigma sqrt(t (1 - t)), sigma / 2 at t = 1/2; at the pinned ends the flow is x1 - x0
    bridge = BrownianBridgePath(0.7)
    torch.testing.assert_close(bridge.sigma_t(half), torch.full((16,), 0.35, dtype=torch.float64))
    torch.testing.assert_close(bridge.sigma_t(torch.tensor([0.2])), torch.tensor([0.7 * math.sqrt(0.16)]))
    for t in (zeros, ones):
        torch.testing.assert_close(bridge.u_t(x0, x1, t, bridge.sample_xt(x0, x1, t, eps)), x1 - x0)
    # Lipman's target path starts at N(0, I) itself (x_0 = eps, whatever x0 is) and ends at N(x1, sigma^2)
    target = TargetPath(0.1)
    torch.testing.assert_close(target.sample_xt(x0, x1, zeros, eps), eps)
    torch.testing.assert_close(target.sample_xt(x0, x1, ones, eps), x1 + 0.1 * eps)
    torch.testing.assert_close(target.sigma_t(half), torch.full((16,), 0.55, dtype=torch.float64))
    # the trigonometric mean keeps unit variance for independent standard normal end points: cos^2 + sin^2 = 1
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(200_000, 1, generator=g, dtype=torch.float64), torch.randn(200_000, 1, generator=g, dtype=torch.float64)
    for t in (0.2, 0.5, 0.9):
        assert abs(float(VariancePreservingPath().mu_t(a, b, t).var()) - 1) < 0.02
        assert abs(float(StraightPath().mu_t(a, b, t).var()) - ((1 - t) ** 2 + t**2)) < 0.02  # the straight one does not


@pytest.mark.parametrize("path", [p for p in ALL_PATHS if p.has_score or isinstance(p, TargetPath)], ids=repr)
def test_score_is_the_gradient_of_the_gaussian_log_density(path):
    x0, x1, eps = batch(seed=3)
    t = torch.linspace(0.05, 0.95, 16, dtype=torch.float64)
    x_t = path.sample_xt(x0, x1, t, eps).requires_grad_(True)
    std = path.sigma_t(t)[:, None].expand_as(x_t)
    log_p = torch.distributions.Normal(path.mu_t(x0, x1, t), std).log_prob(x_t).sum()
    (grad,) = torch.autograd.grad(log_p, x_t)
    torch.testing.assert_close(path.score_t(x0, x1, t, x_t.detach()), grad)
    torch.testing.assert_close(path.score_t(x0, x1, t, x_t.detach()), -eps / std)  # -eps / sigma_t


def test_paths_without_noise_have_no_score_or_lambda():
    x0, x1, eps = batch()
    for path in (StraightPath(0.0), VariancePreservingPath(0.0)):
        assert not path.has_score
        with pytest.raises(ValueError, match="needs sigma > 0"):
            path.lambda_t(torch.rand(4))
        with pytest.raises(ValueError, match="sigma_t = 0"):
            path.score_t(x0, x1, 0.5, x0)
    with pytest.raises(ValueError, match="no conditional flow at t = 1"):
        TargetPath(0.0).u_t(x0, x1, torch.ones(16, dtype=torch.float64), x1)


@pytest.mark.parametrize("cls, kwargs, match", [
    (StraightPath, dict(sigma=-0.1), "sigma must be finite and >= 0"),
    (TargetPath, dict(sigma=float("nan")), "sigma must be finite"),
    (BrownianBridgePath, dict(sigma=0.0), r"sigma must be finite and > 0"),
    (VariancePreservingPath, dict(sigma=True), "VariancePreservingPath: sigma"),
])
def test_bad_sigma_is_refused(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_path_and_sigma_given_together_must_agree():
    assert ConditionalFlowMatcher(path=TargetPath(0.2)).sigma == 0.2
    assert ConditionalFlowMatcher(sigma=0.2, path=TargetPath(0.2)).path.sigma == 0.2
    with pytest.raises(ValueError, match="disagrees with the path's sigma"):
        ConditionalFlowMatcher(sigma=0.1, path=TargetPath(0.2))
    with pytest.raises(ValueError, match="path must be an ot_cfm.paths.ProbabilityPath"):
        ConditionalFlowMatcher(path="straight")
    assert set(PATHS) == {"straight", "brownian_bridge", "target", "variance_preserving"}


def _identity_plan(x0, x1):
    return x0, x1


# (ours, torchcfm's): torchcfm's Schrodinger-bridge matcher always re-pairs, ours takes the path alone
PAIRS = [
    (lambda: ConditionalFlowMatcher(sigma=0.3), lambda: tcfm.ConditionalFlowMatcher(sigma=0.3)),
    (lambda: TargetConditionalFlowMatcher(sigma=0.1), lambda: tcfm.TargetConditionalFlowMatcher(sigma=0.1)),
    (lambda: TargetConditionalFlowMatcher(sigma=0.0), lambda: tcfm.TargetConditionalFlowMatcher(sigma=0.0)),
    (lambda: VariancePreservingConditionalFlowMatcher(sigma=0.2),
     lambda: tcfm.VariancePreservingConditionalFlowMatcher(sigma=0.2)),
    (lambda: ConditionalFlowMatcher(path=BrownianBridgePath(0.8)),
     lambda: tcfm.SchrodingerBridgeConditionalFlowMatcher(sigma=0.8)),
]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["straight", "target", "target-0", "vp", "bridge"])
@pytest.mark.parametrize("shape", [(64, 2), (8, 1, 4, 4)])
def test_equals_torchcfm_on_the_same_inputs_and_seed(ours, theirs, shape):
    """Same global seed -> same t, same eps -> same x_t and u_t, through sample_location_and_conditional_flow,
    and each per-formula method on the same (x0, x1, t, x_t)."""
    ours, theirs = ours(), theirs()
    if isinstance(theirs, tcfm.SchrodingerBridgeConditionalFlowMatcher):
        theirs.ot_sampler.sample_plan = _identity_plan  # compare the path: both keep the given pairs
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g) + 1
    torch.manual_seed(11)
    mine = ours.sample_location_and_conditional_flow(x0, x1, return_noise=True)
    torch.manual_seed(11)
    ref = theirs.sample_location_and_conditional_flow(x0, x1, return_noise=True)
    for name, a, b in zip(("t", "x_t", "u_t", "eps"), mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    t, xt, _, eps = mine
    torch.testing.assert_close(ours.compute_mu_t(x0, x1, t), theirs.compute_mu_t(x0, x1, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.compute_sigma_t(t), torch.as_tensor(theirs.compute_sigma_t(t)).expand_as(t),
                               rtol=1e-6, atol=1e-7, check_dtype=False)
    torch.testing.assert_close(ours.sample_xt(x0, x1, t, eps), theirs.sample_xt(x0, x1, t, eps), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.compute_conditional_flow(x0, x1, t, xt),
                               theirs.compute_conditional_flow(x0, x1, t, xt), rtol=1e-5, atol=1e-5)
    if ours.path.has_score:  # torchcfm adds 1e-8 to sigma^2: 1e-6 relative at sigma 0.1
        torch.testing.assert_close(ours.compute_lambda(t), torch.as_tensor(theirs.compute_lambda(t)).expand_as(t),
                                   rtol=1e-5, atol=0, check_dtype=False)


def test_schrodinger_bridge_matcher_has_torchcfm_formulas():
    ours, theirs = SchrodingerBridgeConditionalFlowMatcher(sigma=0.5), tcfm.SchrodingerBridgeConditionalFlowMatcher(0.5)
    x0, x1, eps = batch(dtype=torch.float32)
    t = torch.rand(16, generator=torch.Generator().manual_seed(2))
    xt = ours.sample_xt(x0, x1, t, eps)
    torch.testing.assert_close(xt, theirs.sample_xt(x0, x1, t, eps))
    torch.testing.assert_close(ours.compute_conditional_flow(x0, x1, t, xt), theirs.compute_conditional_flow(x0, x1, t, xt))
    torch.testing.assert_close(ours.compute_lambda(t), theirs.compute_lambda(t))


def test_noise_follows_the_generator_not_the_global_stream():
    m = ConditionalFlowMatcher(path=BrownianBridgePath(1.0))
    x = torch.zeros(5, 3, dtype=torch.float64)
    a = m.sample_noise_like(x, torch.Generator().manual_seed(4))
    torch.manual_seed(99)
    b = m.sample_noise_like(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.dtype == torch.float64 and a.shape == x.shape
