"""Manifolds: samples lie on M, projections are nearest points, projectors are orthogonal and complementary."""

import pytest
import torch

from manifold_tests.manifolds import (
    MANIFOLD_NAMES,
    Circle,
    CliffordTorus,
    Cylinder,
    GaussianBlock,
    PointBlock,
    ProductManifold,
    Sphere,
    SphereBlock,
    Subspace,
    manifold_by_name,
)

MANIFOLDS = {
    "sphere": lambda: Sphere(2),
    "sphere-in-R5": lambda: Sphere(2, radius=2.0, ambient_dim=5, offset=1),
    "circle": lambda: Circle(radius=0.5),
    "cylinder": lambda: Cylinder(),
    "cylinder-S2xR2": lambda: Cylinder(sphere_dim=2, line_dim=2, radius=1.5, scale=0.5),
    "torus": lambda: CliffordTorus((1.0, 0.5)),
    "subspace": lambda: Subspace.spanned_by([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0]], scales=[1.0, 3.0],
                                            mean=[0.0, 1.0, 0.0, 0.0]),
    "product": lambda: ProductManifold([SphereBlock(1, 2.0), GaussianBlock([1.0, 2.0, 3.0], torch.diag(
        torch.tensor([1.0, 0.0, 4.0]))), PointBlock([0.5, -0.5])]),
}
DIMS = {"sphere": (2, 3), "sphere-in-R5": (2, 5), "circle": (1, 3), "cylinder": (2, 3), "cylinder-S2xR2": (4, 5),
        "torus": (2, 4), "subspace": (2, 4), "product": (3, 7)}


@pytest.fixture(params=sorted(MANIFOLDS))
def case(request):
    return request.param, MANIFOLDS[request.param]()


def test_dimensions(case):
    name, m = case
    assert (m.dim, m.ambient_dim) == DIMS[name]
    assert m.codim == m.ambient_dim - m.dim


def test_samples_lie_on_the_manifold(case):
    _, m = case
    y = m.sample(500, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert y.shape == (500, m.ambient_dim) and y.dtype == torch.float64
    torch.testing.assert_close(m.project(y), y, atol=1e-12, rtol=0)
    assert float(m.distance(y).max()) < 1e-12


def test_projection_is_idempotent_and_nearest(case):
    _, m = case
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(200, m.ambient_dim, generator=g, dtype=torch.float64)
    p = m.project(x)
    torch.testing.assert_close(m.project(p), p, atol=1e-12, rtol=0)
    # nearest point: no sample of M is closer than project(x)
    y = m.sample(4000, g, dtype=torch.float64)
    assert bool((m.distance(x) <= torch.cdist(x, y).min(1).values + 1e-12).all())
    # x - project(x) is normal to M at project(x)
    tangent = m.tangent_projector(x)
    assert float((tangent @ (x - p)[:, :, None]).abs().max()) < 1e-12


def test_projectors_are_orthogonal_and_complementary(case):
    _, m = case
    x = 2 * torch.randn(100, m.ambient_dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pt, pn = m.tangent_projector(x), m.normal_projector(x)
    eye = torch.eye(m.ambient_dim, dtype=torch.float64).expand_as(pt)
    torch.testing.assert_close(pt + pn, eye, atol=1e-12, rtol=0)
    for p in (pt, pn):
        torch.testing.assert_close(p, p.transpose(1, 2), atol=1e-12, rtol=0)
        torch.testing.assert_close(p @ p, p, atol=1e-12, rtol=0)
    assert float((pt @ pn).abs().max()) < 1e-12
    assert torch.equal(torch.linalg.matrix_rank(pt), torch.full((100,), m.dim))
    assert torch.equal(torch.linalg.matrix_rank(pn), torch.full((100,), m.codim))


def test_tangent_projector_is_the_differential_of_the_projection(case):
    """On M, D project(y) = P_T(y): the nearest-point map is the identity along M and flat across it."""
    _, m = case
    y = m.sample(20, torch.Generator().manual_seed(3), dtype=torch.float64)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: m.project(v[None])[0], row) for row in y])
    torch.testing.assert_close(jac, m.tangent_projector(y), atol=1e-10, rtol=0)


def test_sphere_samples_are_uniform():
    """Uniform on S^2 of radius r: mean 0, covariance r^2 I / 3."""
    y = Sphere(2, radius=2.0).sample(200_000, torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(y.mean(0), torch.zeros(3, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(y.T), 4 / 3 * torch.eye(3, dtype=torch.float64), atol=0.02, rtol=0)


def test_potential_transport_map_is_the_blockwise_map(case):
    _, m = case
    x0 = torch.randn(300, m.ambient_dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(m.potential().transport_map(x0), m.transport_map(x0), atol=1e-10, rtol=0)


def test_named_manifolds():
    for name in MANIFOLD_NAMES:
        assert isinstance(manifold_by_name(name), ProductManifold)
    with pytest.raises(ValueError, match="unknown manifold"):
        manifold_by_name("klein bottle")


def test_bad_inputs_raise_value_errors():
    m = Sphere(2)
    with pytest.raises(ValueError, match="ambient dimension 3"):
        m.project(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="NaN"):
        m.tangent_projector(torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError):
        Sphere(0)
    with pytest.raises(ValueError):
        Sphere(2, ambient_dim=4, offset=2)
    with pytest.raises(ValueError):
        SphereBlock(1, radius=-1.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        Subspace(-torch.eye(3))
    with pytest.raises(ValueError, match="symmetric"):
        GaussianBlock([0.0, 0.0], [[1.0, 1.0], [0.0, 1.0]])
    with pytest.raises(ValueError):
        ProductManifold([])
    with pytest.raises(ValueError):
        m.sample(0)
