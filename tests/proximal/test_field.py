"""The exact field as a model: Euler integration lands on T(x0); field_error measures a model against it."""

import dataclasses

import pytest
import torch

from proximal.discrete import DiscreteBrenierPotential
from proximal.field import ExactVelocityField, FieldErrorReport, field_error
from proximal.gaussian import GaussianPotential
from proximal.grid import GridPotential
from proximal.point import PointPotential
from proximal.product import ProductPotential
from proximal.sphere import SpherePotential

F64 = torch.float64


def _discrete():
    gen = torch.Generator().manual_seed(0)
    return DiscreteBrenierPotential(torch.randn(30, 3, generator=gen, dtype=F64), None,
                                    0.3 * torch.randn(30, generator=gen, dtype=F64))


POTENTIALS = {
    "gaussian": lambda: GaussianPotential(torch.tensor([1.0, 0.0, -1.0], dtype=F64),
                                          torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]],
                                                       dtype=F64)),
    "sphere": lambda: SpherePotential(1.5, dim=3),
    "torus": lambda: ProductPotential([(slice(0, 2), SpherePotential(dim=2)),
                                       (slice(2, 3), PointPotential(torch.tensor([0.5], dtype=F64)))]),
    "grid": lambda: GridPotential([torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([-1.0, 0.0, 2.0], dtype=F64),
                                   torch.tensor([3.0, 4.0], dtype=F64)]),
    "discrete": _discrete,
}


def _euler(field, x, steps):
    for k in range(steps):
        x = x + field(k / steps, x) / steps
    return x


@pytest.mark.parametrize("name", POTENTIALS)
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_from_zero_lands_on_the_transport_map(name, steps):
    """Trajectories of the exact field are straight at constant speed, so every Euler step is exact."""
    potential = POTENTIALS[name]()
    x0 = torch.randn(300, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    landed = _euler(ExactVelocityField(potential), x0, steps)
    torch.testing.assert_close(landed, potential.transport_map(x0), atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ["gaussian", "discrete"])
def test_lead_sampler_with_the_exact_field(name):
    sampling = pytest.importorskip("ot_cfm.sampling")
    potential = POTENTIALS[name]()
    x0 = torch.randn(200, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    for steps in (1, 4):
        result = sampling.sample(ExactVelocityField(potential), x0, solver="euler", steps=steps)
        torch.testing.assert_close(result.x, potential.transport_map(x0), atol=1e-9, rtol=0)


def test_field_reshapes_and_accepts_time_formats():
    potential = POTENTIALS["sphere"]()
    field = ExactVelocityField(potential)
    x = torch.randn(8, 1, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    expected = potential.velocity(x.reshape(8, 3), 0.4).reshape(8, 1, 3)
    for t in (0.4, torch.tensor(0.4, dtype=F64), torch.full((8,), 0.4, dtype=F64)):
        out = field(t, x)
        assert out.shape == x.shape and out.dtype == x.dtype
        torch.testing.assert_close(out, expected)


def test_field_end_margin():
    field = ExactVelocityField(POTENTIALS["gaussian"](), end_margin=1e-6)
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(field(1.0, x), field(1 - 1e-6, x))
    torch.testing.assert_close(field(-5e-7, x), field(0.0, x))
    for t in (1.01, -0.01, float("nan")):
        with pytest.raises(ValueError):
            field(t, x)
    with pytest.raises(ValueError):
        field(0.5, torch.randn(4, 2, dtype=F64))
    with pytest.raises(ValueError):
        ExactVelocityField(object())


def test_field_error_of_exact_zero_and_scaled_models():
    potential = POTENTIALS["torus"]()
    times = [0.0, 0.5, 0.9]
    exact = field_error(ExactVelocityField(potential), potential, times, 500,
                        generator=torch.Generator().manual_seed(5))
    assert isinstance(exact, FieldErrorReport) and exact.errors.shape == (3,)
    assert exact.errors.max() < 1e-10  # float32 round-off
    zero = field_error(lambda t, x: torch.zeros_like(x), potential, times, 500,
                       generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(zero.errors, torch.ones(3, dtype=zero.errors.dtype))
    field = ExactVelocityField(potential)
    source = torch.randn(500, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
    scaled = field_error(lambda t, x: 1.1 * field(t, x), potential, torch.tensor(times), 500, source=source)
    torch.testing.assert_close(scaled.errors, torch.full((3,), 0.01, dtype=F64))
    assert scaled.times.dtype == F64
    with pytest.raises(dataclasses.FrozenInstanceError):
        scaled.errors = None


def test_field_error_bad_input():
    potential = POTENTIALS["sphere"]()
    model = ExactVelocityField(potential)
    with pytest.raises(ValueError):
        field_error(model, potential, [0.5, 1.0], 10)
    with pytest.raises(ValueError):
        field_error(model, potential, [], 10)
    with pytest.raises(ValueError):
        field_error(model, potential, [0.5], 0)
    with pytest.raises(ValueError):
        field_error(lambda t, x: x[:, :2], potential, [0.5], 10)
    with pytest.raises(ValueError, match="model returned shape"):  # right size, wrong layout
        field_error(lambda t, x: model(t, x).T, potential, [0.5], 10)
