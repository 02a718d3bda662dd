"""Discrete (semi-discrete OT) potential: the one-matrix-product rule, blocking, the convex-envelope prox."""

import warnings

import numpy as np
import pytest
import torch
from scipy import optimize

from proximal.discrete import DiscreteBrenierPotential

F64 = torch.float64


def _potential(n=40, d=3, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    support = 2 * torch.randn(n, d, generator=gen, dtype=F64)
    weights = torch.rand(n, generator=gen, dtype=F64) + 0.1
    duals = 0.5 * torch.randn(n, generator=gen, dtype=F64)
    return DiscreteBrenierPotential(support, weights / weights.sum(), duals, **kwargs)


def _source(n, d, seed=1, dtype=F64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_t0_is_the_laguerre_cell_by_brute_force():
    potential = _potential()
    x = _source(3000, 3)
    y, g = potential.support.numpy(), potential.dual_weights.numpy()
    expected = np.argmax(x.numpy() @ y.T - g, axis=1)
    np.testing.assert_array_equal(potential.assign(x, 0.0).numpy(), expected)
    torch.testing.assert_close(potential.transport_map(x), potential.support[expected], atol=0, rtol=0)


def test_rule_recovers_the_target_on_the_ot_path_for_random_times():
    potential = _potential()
    x0 = _source(3000, 3)
    j0 = potential.assign(x0, 0.0)
    t = torch.rand(3000, generator=torch.Generator().manual_seed(2), dtype=F64)
    t[:5] = torch.tensor([0.0, 1.0, 0.999, 1e-6, 0.5], dtype=F64)
    xt = (1 - t[:, None]) * x0 + t[:, None] * potential.support[j0]
    np.testing.assert_array_equal(potential.assign(xt, t).numpy(), j0.numpy())
    torch.testing.assert_close(potential.recover_target(xt, t), potential.support[j0], atol=0, rtol=0)
    inner = t < 1
    torch.testing.assert_close(potential.velocity(xt[inner], t[inner]), (potential.support[j0] - x0)[inner],
                               atol=1e-8, rtol=0)


def test_t1_is_the_nearest_support_point():
    potential = _potential()
    x = 3 * _source(500, 3)
    nearest = torch.cdist(x, potential.support).argmin(1)
    np.testing.assert_array_equal(potential.assign(x, 1.0).numpy(), nearest.numpy())


@pytest.mark.parametrize("block_size, n, batch", [(6, 20, 13), (1000, 300, 101), (5000, 300, 101)])
def test_blocked_equals_unblocked(block_size, n, batch):
    reference = _potential(n=n, block_size=2 ** 30)
    blocked = _potential(n=n, block_size=block_size)
    rows, cols = blocked._blocks(batch)
    assert rows * cols <= block_size and rows < batch and cols < n
    x = _source(batch, 3)
    t = torch.rand(batch, generator=torch.Generator().manual_seed(3), dtype=F64)
    np.testing.assert_array_equal(blocked.assign(x, t).numpy(), reference.assign(x, t).numpy())


def test_float32_near_terminal_time_and_lazy_cast():
    potential = _potential()  # float64 parameters, used with float32 inputs
    x0 = _source(2000, 3, dtype=torch.float32)
    j0 = potential.assign(x0, 0.0)
    target = potential.transport_map(x0)
    assert target.dtype == torch.float32
    for t in [1 - 1e-3, 1 - 1e-5, 1 - 1e-7]:
        xt = (1 - t) * x0 + t * target
        assert (potential.assign(xt, t) == j0).float().mean() > 0.999
        u = potential.velocity(xt, t)
        assert u.dtype == torch.float32 and torch.isfinite(u).all()


def _scipy_prox(y, g, z, lam):
    """prox_{lam phi^*}(z) = Y^T p, p = argmin over the simplex of lam <p, g> + |Y^T p - z|^2 / 2 (SLSQP)."""
    n = y.shape[0]
    result = optimize.minimize(lambda p: lam * p @ g + 0.5 * np.sum((p @ y - z) ** 2), np.full(n, 1.0 / n),
                               jac=lambda p: lam * g + y @ (p @ y - z), method="SLSQP", bounds=[(0, 1)] * n,
                               constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1, "jac": lambda p: np.ones(n)}],
                               options={"ftol": 1e-15, "maxiter": 2000})
    return result.x @ y


def test_convex_envelope_prox_against_scipy():
    potential = _potential(n=8, d=2, seed=4)
    z = 2.5 * _source(12, 2, seed=5)
    lam = torch.linspace(0.05, 3.0, 12, dtype=F64)
    ours = potential.prox_conjugate(z, lam)
    y, g = potential.support.numpy(), potential.dual_weights.numpy()
    for k in range(12):
        np.testing.assert_allclose(ours[k].numpy(), _scipy_prox(y, g, z[k].numpy(), float(lam[k])), atol=1e-6)


def test_convex_envelope_prox_agrees_with_the_rule_on_the_ot_path():
    potential = _potential(n=30, d=2, seed=6)
    x0 = _source(40, 2, seed=7)
    target = potential.transport_map(x0)
    for t in [0.2, 0.7]:
        xt = (1 - t) * x0 + t * target
        torch.testing.assert_close(potential.prox_conjugate(xt / t, (1 - t) / t), target, atol=1e-6, rtol=0)


def test_prox_warns_when_it_cannot_certify():
    potential = _potential(n=30, d=2, seed=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        potential.prox_conjugate(3 * _source(4, 2), 0.5, tol=1e-300, max_iter=10)
    assert any("error bound" in str(w.message) for w in caught)


@pytest.mark.parametrize("change, message", [
    (lambda s, w, g: (s.index_fill(0, torch.tensor([3]), float("nan")), w, g), "NaN"),
    (lambda s, w, g: (torch.cat([s, s[:1]]), torch.cat([w[:-1], w[-1:] / 2, w[-1:] / 2]), torch.cat([g, g[:1]])),
     "duplicate"),
    (lambda s, w, g: (s, w - w.max(), g), "non-negative"),
    (lambda s, w, g: (s, 2 * w, g), "sum to 1"),
    (lambda s, w, g: (s, w, g[:-1]), "shape"),
    (lambda s, w, g: (s, w[:-1], g), "shape"),
    (lambda s, w, g: (s[:, 0], w, g), "shape"),
])
def test_bad_construction_raises(change, message):
    base = _potential(n=10)
    with pytest.raises(ValueError, match=message):
        DiscreteBrenierPotential(*change(base.support, base.weights, base.dual_weights))


def test_bad_calls_raise():
    potential = _potential()
    x = _source(5, 3)
    for call in [lambda: potential.assign(_source(5, 2), 0.0), lambda: potential.assign(x, 1.5),
                 lambda: potential.assign(x.index_fill(0, torch.tensor([1]), float("nan")), 0.0),
                 lambda: potential.velocity(x, 1.0), lambda: potential.prox_conjugate(x, 0.0),
                 lambda: potential.assign(x, torch.zeros(4, dtype=F64))]:
        with pytest.raises(ValueError):
            call()


def test_single_and_multiple_column_blocks_match_brute_force_in_both_dtypes():
    # One column block (argmin per row block) and several column blocks (running min) against the
    # explicit rule, with the lifted support cached per dtype.
    single, multi = _potential(n=300, block_size=2 ** 30), _potential(n=300, block_size=1000)
    assert single._blocks(257)[1] == 300 and multi._blocks(257)[1] < 300
    y, g = single.support, single.dual_weights
    x = _source(257, 3)
    t = torch.rand(257, generator=torch.Generator().manual_seed(4), dtype=F64)
    expected = (2 * (1 - t[:, None]) * g - 2 * x @ y.T + t[:, None] * y.square().sum(1)).argmin(1)
    for dtype in (torch.float32, F64):
        for potential in (single, multi):
            agree = (potential.assign(x.to(dtype), t.to(dtype)) == expected).double().mean()
            assert agree == 1.0 if dtype == F64 else agree > 0.99
        assert single._lifted_support(x.to(dtype)).shape == (5, 300)
        assert single._lifted_support(x.to(dtype)).dtype == dtype
