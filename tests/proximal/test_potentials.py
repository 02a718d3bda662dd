"""Closed-form potentials: exact target recovery on the OT path, prox against a generic solver."""

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from proximal.gaussian import GaussianPotential
from proximal.grid import GridPotential
from proximal.point import PointPotential
from proximal.product import ProductPotential
from proximal.sphere import SpherePotential

F64 = torch.float64
TIMES = [0.0, 0.1, 0.5, 0.9, 0.999]


def _gaussian(rank):
    gen = torch.Generator().manual_seed(1)
    factor = torch.randn(3, rank, generator=gen, dtype=F64)
    return GaussianPotential(torch.tensor([0.5, -1.0, 2.0], dtype=F64), factor @ factor.T)


def _grid():
    return GridPotential([torch.tensor([0.0, 1.0, 3.0], dtype=F64), torch.tensor([2.0, -1.0], dtype=F64),
                          torch.tensor([5.0, 6.0, 7.5, 8.0], dtype=F64)],
                         [torch.tensor([0.2, 0.5, 0.3], dtype=F64), None, torch.tensor([0.1, 0.2, 0.3, 0.4])])


POTENTIALS = {
    "gaussian_full": lambda: _gaussian(3),
    "gaussian_singular": lambda: _gaussian(1),
    "sphere": lambda: SpherePotential(2.0, dim=3),
    "point": lambda: PointPotential(torch.tensor([1.0, -2.0, 0.5], dtype=F64)),
    "cylinder": lambda: ProductPotential([(slice(0, 2), SpherePotential(dim=2)),
                                          (slice(2, 3), GaussianPotential(torch.zeros(1), 4 * torch.eye(1)))]),
    "circle_interleaved": lambda: ProductPotential([(slice(0, 3, 2), SpherePotential(1.5, dim=2)),
                                                    (slice(1, 2), PointPotential(torch.tensor([3.0])))]),
    "grid": _grid,
}

# numpy phi of each potential, for the generic numerical prox
PHI = {
    "gaussian_full": None, "gaussian_singular": None,  # filled from the potential's mean and A
    "sphere": lambda p: (lambda x: 2.0 * np.linalg.norm(x)),
    "point": lambda p: (lambda x: float(np.dot([1.0, -2.0, 0.5], x))),
    "cylinder": lambda p: (lambda x: np.linalg.norm(x[:2]) + 2.0 * x[2] ** 2 / 2),
    "circle_interleaved": lambda p: (lambda x: 1.5 * np.linalg.norm(x[[0, 2]]) + 3.0 * x[1]),
}


def _phi(name, potential):
    if name.startswith("gaussian"):
        m, a = potential.mean.numpy(), potential.sqrt_cov.numpy()
        return lambda x: float(m @ x + x @ a @ x / 2)
    if name == "grid":  # max of affine functions: one linear constraint per piece
        d = potential.as_discrete()
        return d.support.numpy(), d.dual_weights.numpy()
    return PHI[name](potential)


def _numerical_prox_phi(phi, w, lam):
    """prox_{phi/lam}(w) = argmin_x phi(x)/lam + |x - w|^2/2, via the epigraph: min s/lam + |x-w|^2/2, s >= phi(x).

    ``phi`` is a callable, or a pair (Y, g) for phi(x) = max_j <x, y_j> - g_j.
    """
    d = w.shape[0]
    if isinstance(phi, tuple):
        y, g = phi
        constraint = {"type": "ineq", "fun": lambda v: v[d] - (y @ v[:d] - g),
                      "jac": lambda v: np.hstack([-y, np.ones((y.shape[0], 1))])}
        value = lambda x: float(np.max(y @ x - g))  # noqa: E731
    else:
        constraint = {"type": "ineq", "fun": lambda v: v[d] - phi(v[:d])}
        value = phi
    start = np.concatenate([w, [value(w) + 1.0]])
    for _ in range(2):  # a restart polishes SLSQP's last digits
        start = optimize.minimize(lambda v: v[d] / lam + 0.5 * np.sum((v[:d] - w) ** 2), start, method="SLSQP",
                                  jac=lambda v: np.concatenate([v[:d] - w, [1 / lam]]), constraints=[constraint],
                                  options={"ftol": 1e-15, "maxiter": 1000}).x
    return start[:d]


def _path(potential, n=400, seed=0, dtype=F64):
    x0 = torch.randn(n, potential.dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x0, potential.transport_map(x0)


@pytest.mark.parametrize("name", POTENTIALS)
@pytest.mark.parametrize("t", TIMES)
def test_recover_target_on_ot_path(name, t):
    potential = POTENTIALS[name]()
    x0, target = _path(potential)
    xt = (1 - t) * x0 + t * target
    torch.testing.assert_close(potential.recover_target(xt, t), target, atol=1e-10, rtol=0)
    torch.testing.assert_close(potential.velocity(xt, t), target - x0, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", POTENTIALS)
def test_per_sample_times_mixing_zero(name):
    potential = POTENTIALS[name]()
    x0, target = _path(potential, n=60)
    t = torch.tensor([0.0, 0.3, 0.999] * 20, dtype=F64)
    xt = (1 - t[:, None]) * x0 + t[:, None] * target
    out = potential.recover_target(xt, t)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, target, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", POTENTIALS)
def test_moreau_identity_with_numerical_prox_of_phi(name):
    """z = prox_{lam phi^*}(z) + lam prox_{phi/lam}(z/lam), the second prox solved by SLSQP from phi alone."""
    potential = POTENTIALS[name]()
    phi = _phi(name, potential)
    gen = torch.Generator().manual_seed(3)
    z = 3 * torch.randn(5, potential.dim, generator=gen, dtype=F64)
    lam = torch.tensor([0.05, 0.3, 1.0, 2.5, 4.0], dtype=F64)
    ours = potential.prox_conjugate(z, lam)
    for k in range(z.shape[0]):
        zk, lk = z[k].numpy(), float(lam[k])
        reference = zk - lk * _numerical_prox_phi(phi, zk / lk, lk)
        np.testing.assert_allclose(ours[k].numpy(), reference, atol=3e-5 * (1 + lk), rtol=0)  # SLSQP's accuracy


@pytest.mark.parametrize("name", POTENTIALS)
def test_scalar_and_per_row_lam_agree(name):
    potential = POTENTIALS[name]()
    z = torch.randn(5, potential.dim, generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.testing.assert_close(potential.prox_conjugate(z, 0.4),
                               potential.prox_conjugate(z, torch.full((5,), 0.4, dtype=F64)))


@pytest.mark.parametrize("name", POTENTIALS)
def test_float32_near_terminal_time(name):
    potential = POTENTIALS[name]()
    x0, target = _path(potential, dtype=torch.float32)
    assert target.dtype == torch.float32
    for t in [1 - 1e-3, 1 - 1e-5, 1 - 1e-7]:
        xt = (1 - t) * x0 + t * target
        x1 = potential.recover_target(xt, t)
        u = potential.velocity(xt, t)
        assert x1.dtype == torch.float32 and torch.isfinite(x1).all() and torch.isfinite(u).all()
        assert (x1 - target).abs().max() < 1e-4 * (1 + target.abs().max())


def test_gaussian_singular_maps_onto_its_subspace():
    potential = _gaussian(1)
    x0, target = _path(potential, n=2000)
    centred = (target - potential.mean).numpy()
    assert np.linalg.matrix_rank(centred, tol=1e-8) == 1
    np.testing.assert_allclose(np.cov(target.numpy().T), (potential.sqrt_cov @ potential.sqrt_cov).numpy(),
                               atol=0.3)


def test_sphere_map_lands_on_the_sphere_and_prox_projects():
    potential = SpherePotential(2.0, dim=4)
    x0, target = _path(potential)
    torch.testing.assert_close(target.norm(dim=1), torch.full((400,), 2.0, dtype=F64))
    z = torch.tensor([[0.5, 0, 0, 0], [0, 3.0, 0, 4.0]], dtype=F64)
    torch.testing.assert_close(potential.prox_conjugate(z, 0.7), torch.tensor([[0.5, 0, 0, 0], [0, 1.2, 0, 1.6]],
                                                                              dtype=F64))


def test_grid_1d_map_is_the_gaussian_quantile_map():
    points = np.array([-1.0, 0.3, 0.4, 2.0, 5.0])
    weights = np.array([0.1, 0.35, 0.05, 0.3, 0.2])
    order = np.array([3, 0, 4, 1, 2])  # unsorted input must be handled
    potential = GridPotential([torch.tensor(points[order])], [torch.tensor(weights[order])])
    x = np.random.default_rng(0).standard_normal(5000)
    expected = points[np.searchsorted(np.cumsum(weights), stats.norm.cdf(x))]
    np.testing.assert_array_equal(potential.transport_map(torch.tensor(x)[:, None]).numpy()[:, 0], expected)


def test_grid_discrete_form_has_the_right_cell_masses():
    potential = _grid()
    discrete = potential.as_discrete()
    assert discrete.support.shape == (24, 3)
    n = 2 ** 18
    x0 = torch.randn(n, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    torch.testing.assert_close(discrete.transport_map(x0), potential.transport_map(x0), atol=0, rtol=0)
    masses = torch.bincount(discrete.assign(x0), minlength=24).to(F64) / n
    w = discrete.weights
    assert ((masses - w).abs() <= 5 * torch.sqrt(w * (1 - w) / n) + 1e-12).all()


@pytest.mark.parametrize("make, message", [
    (lambda: GaussianPotential(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, -1.0]])), "semi-definite"),
    (lambda: GaussianPotential(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]])), "symmetric"),
    (lambda: GaussianPotential(torch.zeros(2), torch.eye(3)), "shape"),
    (lambda: SpherePotential(-1.0), "radius"),
    (lambda: PointPotential(torch.tensor([float("nan")])), "finite"),
    (lambda: ProductPotential([(slice(0, 2), SpherePotential(dim=2)), (slice(1, 3), SpherePotential(dim=2))]),
     "exactly once"),
    (lambda: ProductPotential([(slice(0, 2), SpherePotential(dim=3))]), "covers"),
    (lambda: GridPotential([torch.tensor([0.0, 0.0])]), "duplicate"),
    (lambda: GridPotential([torch.tensor([0.0, 1.0])], [torch.tensor([0.3, 0.3])]), "sum to 1"),
])
def test_bad_construction_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("name", POTENTIALS)
def test_bad_calls_raise(name):
    potential = POTENTIALS[name]()
    x = torch.zeros(4, 3, dtype=F64) + 0.5
    for t in [1.0, -0.1, 1.5, float("nan"), torch.zeros(3, dtype=F64)]:
        with pytest.raises(ValueError):
            potential.velocity(x, t)
    bad = x.clone()
    bad[1, 2] = float("nan")
    for call in [lambda: potential.recover_target(bad, 0.5), lambda: potential.transport_map(bad),
                 lambda: potential.recover_target(torch.zeros(4, 2, dtype=F64), 0.5),
                 lambda: potential.prox_conjugate(x, 0.0), lambda: potential.prox_conjugate(x, -1.0),
                 lambda: potential.recover_target(x, 1.0)]:
        with pytest.raises(ValueError):
            call()


def test_gaussian_sqrt_cov_squares_to_cov_and_is_symmetric_positive_definite():
    """A = S^{1/2}: A A = S to 1e-10 relative, A = A^T, A > 0 (A = S or a Cholesky factor fails).

    cov = F F^T + I/2 in d = 5 has condition number about 20, so the eigendecomposition loses
    only a few ulps: 1e-10 relative (Frobenius) leaves a wide margin over float64 round-off.
    """
    gen = torch.Generator().manual_seed(7)
    factor = torch.randn(5, 5, generator=gen, dtype=F64)
    cov = factor @ factor.T + 0.5 * torch.eye(5, dtype=F64)
    a = GaussianPotential(torch.zeros(5, dtype=F64), cov).sqrt_cov
    assert a.dtype == F64 and a.shape == (5, 5)
    assert float(torch.linalg.matrix_norm(a @ a - cov) / torch.linalg.matrix_norm(cov)) < 1e-10
    assert float((a - a.T).abs().max()) < 1e-12 * float(a.abs().max())
    assert float(torch.linalg.eigvalsh((a + a.T) / 2).min()) > 0


def _orthogonal(d, seed):
    """A seeded random orthogonal matrix (QR of a Gaussian matrix); the identity for seed None."""
    if seed is None:
        return np.eye(d)
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))[0]


GAUSSIAN_CLOSED_FORM = [(None, (4.0, 9.0)), (10, (4.0, 9.0)), (11, (4.0, 9.0, 0.25)), (12, (4.0, 0.0, 1.0))]


@pytest.mark.parametrize("seed, eigenvalues", GAUSSIAN_CLOSED_FORM)
def test_gaussian_matches_its_closed_form(seed, eigenvalues):
    """cov = Q diag(e) Q^T, so A = S^{1/2} = Q diag(sqrt e) Q^T is known exactly, built here in numpy.

    With D = (1 - t) I + t A (invertible for t < 1, A >= 0), DESIGN.md section 1 gives
    T(x) = m + A x, prox_{lam phi^*}(z) = m + A (A + lam I)^{-1} (z - m) (phi^*(y) = |A^{-1/2}(y - m)|^2 / 2
    on m + range A), and on x_t = D x0 + t m: x1 = m + A x0, u_t = (A - I) x0 + m with
    x0 = D^{-1} (x - t m). The field is affine, so these hold at any x, not only on the support
    of mu_t. Q = I gives diag(2, 3); the rotated 3D cases (one singular) exercise the eigenbasis,
    whose transpose is invisible in 2D (eigh's 2x2 basis is often a symmetric reflection).
    Tolerance 1e-12, relative too for u_t, which reaches |x| / (1 - t) ~ 1e3 in the singular case
    at t = 0.999: condition numbers are at most 1e3.
    """
    d = len(eigenvalues)
    m = np.array([0.5, -1.0, 2.0])[:d]
    rot = _orthogonal(d, seed)
    cov = rot @ np.diag(eigenvalues) @ rot.T
    a = rot @ np.diag(np.sqrt(eigenvalues)) @ rot.T
    potential = GaussianPotential(torch.tensor(m), torch.tensor(cov))
    np.testing.assert_allclose(potential.sqrt_cov.numpy(), a, atol=1e-14, rtol=0)
    x = 2 * np.random.default_rng(8).standard_normal((50, d))
    xt = torch.tensor(x)
    np.testing.assert_allclose(potential.transport_map(xt).numpy(), m + x @ a.T, atol=1e-13, rtol=0)
    for lam in (0.05, 1.0, 4.0):
        expected = m + (x - m) @ np.linalg.solve(a + lam * np.eye(d), a).T  # A (A + lam I)^{-1}, commuting
        np.testing.assert_allclose(potential.prox_conjugate(xt, lam).numpy(), expected, atol=1e-12, rtol=0)
    for t in TIMES:
        x0 = np.linalg.solve((1 - t) * np.eye(d) + t * a, (x - t * m).T).T
        np.testing.assert_allclose(potential.velocity(xt, t).numpy(), x0 @ (a - np.eye(d)).T + m,
                                   atol=1e-12, rtol=1e-12)
        np.testing.assert_allclose(potential.recover_target(xt, t).numpy(), m + x0 @ a.T, atol=1e-12, rtol=0)


def test_gaussian_diagonal_closed_form_is_exact():
    """cov = diag(4, 9): T(x) = m + diag(2, 3) x in every digit (the eigenbasis of a diagonal cov is
    the identity up to signs and sqrt(4), sqrt(9) are exact), so no tolerance is needed."""
    m = torch.tensor([0.5, -1.0], dtype=F64)
    potential = GaussianPotential(m, torch.diag(torch.tensor([4.0, 9.0], dtype=F64)))
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(9), dtype=F64)
    expected = torch.stack([m[0] + 2 * x[:, 0], m[1] + 3 * x[:, 1]], dim=1)
    torch.testing.assert_close(potential.transport_map(x), expected, atol=0, rtol=0)
    torch.testing.assert_close(potential.sqrt_cov, torch.diag(torch.tensor([2.0, 3.0], dtype=F64)), atol=0, rtol=0)
