"""Schrodinger-bridge CFM: the coupling (Sinkhorn, epsilon = 2 sigma^2) and its small-sigma limit (exact OT),
the score term of the loss, FlowAndScore models, and SDE sampling against a Gaussian closed form."""

import math
import warnings

import pytest
import torch

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.sinkhorn import SinkhornCoupler
from ot_cfm.matcher import ConditionalFlowMatcher, SchrodingerBridgeConditionalFlowMatcher
from ot_cfm.models import MLP, FlowAndScore, has_score, model_from_config
from ot_cfm.paths import BrownianBridgePath
from ot_cfm.solvers.ode import sample
from ot_cfm.solvers.sde import sample_sde
from ot_cfm.training import TrainConfig, Trainer


def test_default_coupler_is_sinkhorn_with_epsilon_two_sigma_squared_absolute():
    m = SchrodingerBridgeConditionalFlowMatcher(sigma=0.3)
    assert isinstance(m.coupler, SinkhornCoupler) and not m.coupler.relative
    assert math.isclose(m.coupler.epsilon, 2 * 0.3**2) and m.path.sigma_t(torch.tensor(0.5)) == 0.15
    assert isinstance(SchrodingerBridgeConditionalFlowMatcher(0.3, coupler="exact").coupler, ExactOTCoupler)
    for bad in (SinkhornCoupler(epsilon=0.18), SinkhornCoupler(epsilon=0.5, relative=False)):
        with pytest.raises(ValueError, match=r"epsilon = 2 sigma\^2 = 0.18"):
            SchrodingerBridgeConditionalFlowMatcher(0.3, coupler=bad)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        SchrodingerBridgeConditionalFlowMatcher(0.0)


def _rows_equal(a, b):
    return float((a == b).all(1).double().mean())


def test_small_sigma_gives_the_exact_ot_pairs_and_large_sigma_does_not():
    """SB-CFM's coupling is the entropic plan with epsilon = 2 sigma^2: at sigma = 0.05 on this batch its plan is
    the exact OT permutation up to the Sinkhorn tolerance, and every drawn pair is ExactOTCoupler's; at
    sigma = 1 the plan is spread and the drawn pairs differ."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 2, generator=g, dtype=torch.float64)
    x1 = torch.randn(8, 2, generator=g, dtype=torch.float64) + 1
    _, exact_x1 = ExactOTCoupler().pair(x0, x1)
    exact_plan = ExactOTCoupler().plan(x0, x1)
    small = SchrodingerBridgeConditionalFlowMatcher(
        0.05, coupler=SinkhornCoupler(epsilon=2 * 0.05**2, relative=False, max_iters=5000))  # small epsilon: more iterations
    torch.testing.assert_close(small.coupler.plan(x0, x1), exact_plan, rtol=0, atol=1e-3)
    large = SchrodingerBridgeConditionalFlowMatcher(1.0)
    agree = {"small": [], "large": []}
    for seed in range(4):
        for name, m in (("small", small), ("large", large)):
            a, b, _, _ = m.couple(x0, x1, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(a, x0)  # every source once, in order
            agree[name].append(_rows_equal(b, exact_x1))
    assert agree["small"] == [1.0] * 4
    assert min(agree["large"]) < 0.8


def test_loss_terms_vanish_for_the_conditional_flow_and_score():
    """With the pairing fixed (no coupler), a model returning the bridge's conditional flow and conditional
    score -(x - mu_t) / sigma_t^2 has both loss terms zero to round-off; a zero score head has score term
    E |eps|^2 = 1 per coordinate."""
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(4096, 2, generator=g, dtype=torch.float64), torch.randn(4096, 2, generator=g, dtype=torch.float64)
    path = BrownianBridgePath(0.8)
    m = ConditionalFlowMatcher(path=path)

    class Exact(torch.nn.Module):
        def forward(self, t, x):
            return path.u_t(x0, x1, t, x)

        def score(self, t, x):
            return path.score_t(x0, x1, t, x)

    terms = m.loss_terms(Exact(), x0, x1, generator=torch.Generator().manual_seed(2))
    assert terms.flow.item() < 1e-20 and terms.score.item() < 1e-20
    zero = FlowAndScore(MLP(2), MLP(2))
    for p in zero.score_net.parameters():
        torch.nn.init.zeros_(p)
    terms = m.loss_terms(zero.double(), x0, x1, generator=torch.Generator().manual_seed(2))
    assert abs(terms.score.item() - 1.0) < 0.05 and torch.equal(terms.total, terms.flow + terms.score)


def test_score_head_is_refused_on_a_path_without_noise_and_checked_for_shape():
    model = FlowAndScore(MLP(2), MLP(2))
    with pytest.raises(ValueError, match="score matching needs sigma > 0"):
        ConditionalFlowMatcher(sigma=0.0).loss(model, torch.randn(4, 2), torch.randn(4, 2))

    class BadScore(torch.nn.Module):
        def forward(self, t, x):
            return x

        def score(self, t, x):
            return x[:, :1]

    with pytest.raises(ValueError, match="model.score returned shape"):
        ConditionalFlowMatcher(path=BrownianBridgePath(1.0)).loss(BadScore(), torch.randn(4, 2), torch.randn(4, 2))


def test_flow_and_score_model_contract_and_config():
    torch.manual_seed(0)
    model = FlowAndScore(MLP(2, width=8), MLP(2, width=16))
    x, t = torch.randn(5, 2), torch.rand(5)
    assert has_score(model) and not has_score(MLP(2))
    torch.testing.assert_close(model(t, x), model.flow_net(t, x))
    torch.testing.assert_close(model.score(t, x), model.score_net(t, x))
    rebuilt = model_from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.score(t, x), model.score(t, x))
    cond = FlowAndScore(MLP(2, num_classes=3), MLP(2, num_classes=3))
    assert cond.null_label == 3 and cond(t, x, 1).shape == x.shape and cond.score(t, x, 3).shape == x.shape
    with pytest.raises(ValueError, match="flow and score must take the same labels"):
        FlowAndScore(MLP(2, num_classes=3), MLP(2))


def test_score_term_decreases_in_a_few_training_steps_and_the_trainer_needs_no_change():
    """60 Adam steps on a narrow Gaussian pair (sigma = 1: the bridge's noise dominates, so eps is predictable
    from x_t): the score term falls from about 1 (E |eps|^2 per coordinate; mean of the first 3 steps) to below
    half of that (mean of the last 10); measured 0.88 -> 0.19. The Trainer trains the same model through matcher.loss unchanged."""
    torch.manual_seed(0)
    model = FlowAndScore(MLP(2, width=32, depth=2), MLP(2, width=32, depth=2))
    m = SchrodingerBridgeConditionalFlowMatcher(sigma=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    shift = torch.tensor([1.0, 1.0])

    def source(n, gen):
        return 0.1 * torch.randn(n, 2, generator=gen)

    def target(n, gen):
        return 0.1 * torch.randn(n, 2, generator=gen) + shift

    scores = []
    for _ in range(60):
        terms = m.loss_terms(model, source(128, g), target(128, g), generator=g)
        opt.zero_grad()
        terms.total.backward()
        opt.step()
        scores.append(terms.score.item())
    first, last = sum(scores[:3]) / 3, sum(scores[-10:]) / 10
    assert first > 0.7 and last < 0.5 * first
    small = FlowAndScore(MLP(2, width=8, depth=1), MLP(2, width=8, depth=1))
    before = [p.detach().clone() for p in small.score_net.parameters()]
    result = Trainer(small, m, source, target, TrainConfig(steps=3, batch_size=32, progress=False)).fit()
    assert result.step == 3 and math.isfinite(result.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, small.score_net.parameters()))  # the score head trained


# Gaussian case with closed forms: x0 ~ N(0, I), x1 ~ N(m, s^2 I) independent, Brownian bridge of diffusion SIGMA.
# The marginal is N(t m, v_t I), v_t = (1 - t)^2 + t^2 s^2 + SIGMA^2 t (1 - t); the field
# u = m + v_t' / (2 v_t) (x - t m) generates it and the score is -(x - t m) / v_t.
MEAN, S2, SIGMA = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.25, 1.0


def _var(t):
    return (1 - t) ** 2 + t**2 * S2 + SIGMA**2 * t * (1 - t)


def _field(t, x):
    dvar = -2 * (1 - t) + 2 * t * S2 + SIGMA**2 * (1 - 2 * t)
    return MEAN + dvar / (2 * _var(t)) * (x - t * MEAN)


def _score(t, x):
    return -(x - t * MEAN) / _var(t)


@pytest.mark.parametrize("solver, steps", [("euler", 100), ("srk", 20)])
def test_sde_sampling_reaches_the_gaussian_marginal_at_t_1(solver, steps):
    """Mean within 0.05 of m and covariance within 0.05 of s^2 I = 0.25 I at t = 1 (4000 samples: the sampling
    error of each is about 0.01). Without the score's drift correction the same noise spreads the samples to a
    covariance of about 0.75 I, so the check fails for a missing or wrongly scaled score."""
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample_sde(_field, _score, x0, sigma=SIGMA, steps=steps, generator=torch.Generator().manual_seed(1),
                     solver=solver)
    assert out.x.dtype == torch.float64 and out.x.shape == x0.shape
    assert (out.x.mean(0) - MEAN).abs().max() < 0.05
    assert (torch.cov(out.x.T) - S2 * torch.eye(2, dtype=torch.float64)).abs().max() < 0.05
    if solver == "euler":
        without = sample_sde(_field, lambda t, x: torch.zeros_like(x), x0, sigma=SIGMA, steps=steps,
                             generator=torch.Generator().manual_seed(1))
        assert torch.cov(without.x.T).diagonal().min() > S2 + 0.3
        ode = sample(_field, x0, solver="euler", steps=steps)  # the ODE of the same field: the same marginal
        assert (torch.cov(ode.x.T) - S2 * torch.eye(2, dtype=torch.float64)).abs().max() < 0.05


def test_sde_sampling_is_seeded_by_the_generator_only():
    x0 = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))  # any (B, *shape)

    def f(t, x):
        return 1.0 - x

    def s(t, x):
        return -x

    state = torch.get_rng_state()
    a = sample_sde(f, s, x0, sigma=0.5, steps=10, generator=torch.Generator().manual_seed(3), return_trajectory=True)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is neither used nor advanced
    b = sample_sde(f, s, x0, sigma=0.5, steps=10, generator=torch.Generator().manual_seed(3))
    c = sample_sde(f, s, x0, sigma=0.5, steps=10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
    assert a.trajectory.shape == (11, 64, 1, 2, 2) and torch.equal(a.trajectory[0], x0) and a.times[-1] == 1.0
    assert a.x.dtype == torch.float32 and a.nfe == 11  # one drift call per Euler step, and torchsde's shape check


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=0.0), "sigma"), (dict(steps=0), "steps"), (dict(solver="heun"), "solver must be one of"),
    (dict(generator=None), "generator must be a torch.Generator"), (dict(t_span=(1.0, 0.0)), "t_span"),
])
def test_sde_sampling_refuses_bad_arguments(kwargs, match):
    args = dict(sigma=1.0, steps=4, generator=torch.Generator().manual_seed(0)) | kwargs
    with pytest.raises(ValueError, match=match):
        sample_sde(_field, _score, torch.zeros(3, 2, dtype=torch.float64), **args)
    with pytest.raises(ValueError, match="score returned shape"):
        sample_sde(_field, lambda t, x: x[:, :1], torch.zeros(3, 2, dtype=torch.float64), sigma=1.0, steps=2,
                   generator=torch.Generator())


def test_sb_model_samples_with_the_sde():
    """A FlowAndScore model passes to sample_sde as (model, model.score); the result is on x0's device and finite,
    and the default Sinkhorn coupler converges at sigma = 0.5 on a batch of 64 (no max_iters warning)."""
    torch.manual_seed(0)
    model = FlowAndScore(MLP(2, width=8, depth=1), MLP(2, width=8, depth=1))
    m = SchrodingerBridgeConditionalFlowMatcher(sigma=0.5)
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        m.loss(model, torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) + 2, generator=g).backward()
    with torch.no_grad():
        out = sample_sde(model, model.score, torch.randn(32, 2), sigma=0.5, steps=5, generator=g)
    assert out.x.device == torch.zeros(1).device and torch.isfinite(out.x).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sb_cfm_and_sde_sampling_stay_on_the_cuda_device():
    """The matcher's draws, both loss terms and the SDE's Brownian path live on the inputs' device, seeded by a
    generator there; the Gaussian closed form holds there with the CPU test's tolerance."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    x0, x1 = torch.randn(64, 2, generator=g, device=dev), torch.randn(64, 2, generator=g, device=dev) + 2
    model = FlowAndScore(MLP(2), MLP(2)).to(dev)
    m = SchrodingerBridgeConditionalFlowMatcher(sigma=0.5)
    s = m.sample(x0, x1, generator=g)
    assert {s.t.device, s.x_t.device, s.u_t.device, s.noise.device} == {x0.device}
    terms = m.loss_terms(model, x0, x1, generator=g)
    assert terms.flow.device == x0.device and terms.score.device == x0.device
    mean = MEAN.to(dev)

    def field(t, x):
        dvar = -2 * (1 - t) + 2 * t * S2 + SIGMA**2 * (1 - 2 * t)
        return mean + dvar / (2 * _var(t)) * (x - t * mean)

    def score(t, x):
        return -(x - t * mean) / _var(t)

    start = torch.randn(4000, 2, generator=g, device=dev, dtype=torch.float64)
    out = sample_sde(field, score, start, sigma=SIGMA, steps=100, generator=g)
    assert out.x.device == start.device
    assert (out.x.mean(0) - mean).abs().max() < 0.05
    assert (torch.cov(out.x.T) - S2 * torch.eye(2, dtype=torch.float64, device=dev)).abs().max() < 0.05
