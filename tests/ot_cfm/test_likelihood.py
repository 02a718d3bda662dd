"""Log-likelihoods by the instantaneous change of variables: the exact field of a Gaussian target against the
Gaussian log-density, Hutchinson's divergence against the exact one, closed-form flows, bits per dimension."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.distributions import MultivariateNormal

from ot_cfm.solvers.likelihood import EXACT_DIVERGENCE_MAX_DIM, bits_per_dim, divergence, draw_probes, log_likelihood
from proximal import ExactVelocityField, GaussianPotential


def gaussian_target(d=3, seed=0):
    """N(m, S) with a full, well-conditioned S (eigenvalues 0.3 .. 2.3), float64."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    cov = q @ torch.diag(torch.linspace(0.3, 2.3, d, dtype=torch.float64)) @ q.T
    return torch.randn(d, generator=g, dtype=torch.float64), (cov + cov.T) / 2


def a_t(cov, t):
    """A_t = (1 - t) I + t S^(1/2): the OT path from N(0, I) to N(m, S) is x_t = t m + A_t z."""
    evals, evecs = torch.linalg.eigh(cov)
    return evecs @ torch.diag((1 - t) + t * evals.sqrt()) @ evecs.T


@pytest.mark.parametrize("t1", [0.5, 1 - 1e-6])
def test_exact_field_of_a_gaussian_gives_the_gaussian_log_density(t1):
    """proximal's exact field carries N(0, I) to N(t m, A_t^2) at time t: the log-likelihood at t1 is that Gaussian
    log-density (torch's MultivariateNormal) to the solver's tolerance, and the source points are z = A_t1^{-1}
    (x - t1 m). The exact field has no value at t = 1, so t1 < 1; at 1 - 1e-6 it is within 1e-4 of N(m, S)'s."""
    mean, cov = gaussian_target()
    field = ExactVelocityField(GaussianPotential(mean, cov))
    a = a_t(cov, t1)
    g = torch.Generator().manual_seed(1)
    x = t1 * mean + torch.randn(64, 3, generator=g, dtype=torch.float64) @ a.T
    res = log_likelihood(field, x, t_span=(0.0, t1), atol=1e-9, rtol=1e-9)
    assert res.method == "exact"
    expected = MultivariateNormal(t1 * mean, a @ a.T).log_prob(x)
    torch.testing.assert_close(res.log_likelihood, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.z, torch.linalg.solve(a, (x - t1 * mean).T).T, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.log_prior + res.delta, res.log_likelihood, rtol=0, atol=0)
    if t1 > 0.99:
        assert (res.log_likelihood - MultivariateNormal(mean, cov).log_prob(x)).abs().max() < 1e-4


def mlp_field(d, seed=0):
    """A nonlinear field v(t, x) = tanh(x W1 + t) W2, sample by sample, with seeded weights."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d, 16, generator=g, dtype=torch.float64)
    w2 = torch.randn(16, d, generator=g, dtype=torch.float64) / 4
    return lambda t, x: torch.tanh(x @ w1 + t) @ w2


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_agrees_with_the_exact_divergence_in_expectation(kind):
    """At 6 points of a 5D nonlinear field: the exact divergence equals the trace of torch's Jacobian, and the mean
    of 4000 one-probe Hutchinson estimates lies within 5 standard errors of it (the probes drawn for the batch
    repeated 4000 times, so one backward pass gives every estimate). The same seed gives the same estimate."""
    d, n, k = 5, 6, 4000
    field = mlp_field(d)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    exact = divergence(field, t, x)
    jacobians = [torch.autograd.functional.jacobian(lambda p: field(t, p[None])[0], p) for p in x]
    torch.testing.assert_close(exact, torch.stack([j.trace() for j in jacobians]), rtol=1e-12, atol=1e-12)
    repeated = x.repeat(k, 1)
    estimates = divergence(field, t, repeated, probes=draw_probes(repeated, 1, kind, torch.Generator().manual_seed(3)))
    estimates = estimates.reshape(k, n)
    se = estimates.std(0) / math.sqrt(k)
    assert ((estimates.mean(0) - exact).abs() <= 5 * se).all(), (estimates.mean(0) - exact) / se
    assert (estimates.std(0) > 0).all()
    probes = draw_probes(x, 3, kind, torch.Generator().manual_seed(4))
    assert torch.equal(probes, draw_probes(x, 3, kind, torch.Generator().manual_seed(4)))
    torch.testing.assert_close(divergence(field, t, x, probes=probes),
                               sum(divergence(field, t, x, probes=p[None]) for p in probes) / 3, rtol=1e-12, atol=1e-12)


def test_hutchinson_log_likelihood_is_unbiased_and_seeded():
    """The Gaussian's exact field, 3D, 400 points each with its own Rademacher probe: the Hutchinson
    log-likelihood minus the exact one has mean zero within 5 standard errors over the points, and is not zero
    (S is not diagonal). The same generator seed gives the same values; another seed others."""
    mean, cov = gaussian_target(seed=5)
    field = ExactVelocityField(GaussianPotential(mean, cov))
    x = 0.5 * mean + torch.randn(400, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64) @ a_t(cov, 0.5)
    kwargs = {"t_span": (0.0, 0.5), "atol": 1e-8, "rtol": 1e-8}
    exact = log_likelihood(field, x, **kwargs).log_likelihood
    hutch = log_likelihood(field, x, divergence="hutchinson", generator=torch.Generator().manual_seed(7), **kwargs)
    assert hutch.method == "hutchinson"
    diff = hutch.log_likelihood - exact
    assert diff.abs().max() > 1e-3
    assert diff.mean().abs() <= 5 * diff.std() / math.sqrt(len(diff))
    again = log_likelihood(field, x, divergence="hutchinson", generator=torch.Generator().manual_seed(7), **kwargs)
    assert torch.equal(again.log_likelihood, hutch.log_likelihood)
    other = log_likelihood(field, x, divergence="hutchinson", generator=torch.Generator().manual_seed(8), **kwargs)
    assert not torch.equal(other.log_likelihood, hutch.log_likelihood)


def test_constant_field_maps_back_to_any_source():
    """v = b moves every point by b over [0, 1] with div v = 0: log p1(x) = log p0(x - b) for any source with a
    log_prob, here a correlated Gaussian."""
    b = torch.tensor([1.5, -2.0], dtype=torch.float64)
    source = MultivariateNormal(torch.tensor([0.3, 0.1], dtype=torch.float64),
                                torch.tensor([[1.0, 0.4], [0.4, 0.5]], dtype=torch.float64))
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    res = log_likelihood(lambda t, y: b.expand_as(y), x, source=source, solver="euler", steps=4)
    torch.testing.assert_close(res.log_likelihood, source.log_prob(x - b), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.delta, torch.zeros(10, dtype=torch.float64), rtol=0, atol=0)
    assert res.nfe == 4


def test_images_use_hutchinson_and_bits_per_dimension():
    """v = c x on images (B, 1, 2, 4): x(0) = e^{-c} x and div v = c D, so log p1(x) = log N(e^{-c} x; 0, I) - c D.
    D = 8 = EXACT_DIVERGENCE_MAX_DIM is exact, (1, 3, 3) is Hutchinson's: Rademacher probes give
    eps^T (c I) eps = c D exactly. Bits per dimension add log2(127.5) to -log2 p / D."""
    c = 0.7
    for shape, method in (((1, 2, 4), "exact"), ((1, 3, 3), "hutchinson")):
        x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
        dim = x[0].numel()
        assert (dim <= EXACT_DIVERGENCE_MAX_DIM) == (method == "exact")
        res = log_likelihood(lambda t, y: c * y, x, generator=torch.Generator().manual_seed(0), atol=1e-10, rtol=1e-10)
        assert res.method == method
        z = math.exp(-c) * x.flatten(1)
        expected = -0.5 * z.square().sum(1) - 0.5 * dim * math.log(2 * math.pi) - c * dim
        torch.testing.assert_close(res.log_likelihood, expected, rtol=0, atol=1e-7)
        torch.testing.assert_close(bits_per_dim(res.log_likelihood, dim),
                                   -res.log_likelihood / (dim * math.log(2)) + math.log2(127.5), rtol=1e-12, atol=1e-12)


def test_bits_per_dimension_of_the_uniform_density_over_256_levels_is_8():
    """Uniform density on 256 cells of width 2/255 per dimension: p = (255 / 512)^D, 8 bits per dimension."""
    for dim in (1, 3072):
        log_p = torch.tensor([dim * math.log(255 / 512)], dtype=torch.float64)
        assert float(bits_per_dim(log_p, dim)) == pytest.approx(8.0, rel=1e-12)
        assert float(bits_per_dim(dim * torch.tensor([math.log(0.5)], dtype=torch.float64), dim,
                                  bin_width=1 / 128)) == pytest.approx(8.0, rel=1e-12)


def test_bad_input_raises():
    x = torch.zeros(4, 2)
    field = mlp_field(2)
    with pytest.raises(ValueError, match="divergence must be one of"):
        log_likelihood(field, x, divergence="trace")
    with pytest.raises(ValueError, match="t0 < t1"):
        log_likelihood(field, x, t_span=(1.0, 0.0))
    with pytest.raises(ValueError, match="probe kind"):
        draw_probes(x, 1, "uniform")
    with pytest.raises(ValueError, match="probes must have shape"):
        divergence(field, 0.0, x.double(), probes=torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected shape \\(4,\\)"):
        log_likelihood(lambda t, y: y, x.double(), source=SimpleNamespace(log_prob=lambda z: z), solver="euler", steps=1)
    with pytest.raises(ValueError, match="field returned shape"):
        log_likelihood(lambda t, y: y[:, :1], x.double(), solver="euler", steps=1)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        bits_per_dim(torch.zeros(1), 0)
