"""The exact field as a model: Euler integration lands on T(x0); field_error measures a model against it."""

import dataclasses
import math
from fractions import Fraction

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
    sampling = pytest.importorskip("ot_cfm.solvers.ode")
    potential = POTENTIALS[name]()
    x0 = torch.randn(200, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    for solver, steps in (("euler", 1), ("euler", 4), ("midpoint", 3)):  # neither evaluates t = 1
        result = sampling.sample(ExactVelocityField(potential), x0, solver=solver, steps=steps)
        torch.testing.assert_close(result.x, potential.transport_map(x0), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="use euler or midpoint"):  # dopri5 evaluates the field at t = 1
        sampling.sample(ExactVelocityField(potential), x0)


def test_field_reshapes_and_accepts_time_formats():
    potential = POTENTIALS["sphere"]()
    field = ExactVelocityField(potential)
    x = torch.randn(8, 1, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    expected = potential.velocity(x.reshape(8, 3), 0.4).reshape(8, 1, 3)
    for t in (0.4, torch.tensor(0.4, dtype=F64), torch.full((8,), 0.4, dtype=F64)):
        out = field(t, x)
        assert out.shape == x.shape and out.dtype == x.dtype
        torch.testing.assert_close(out, expected)


def test_field_times_are_checked_and_never_clamped():
    field = ExactVelocityField(POTENTIALS["gaussian"]())
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match="undefined at t = 1"):
        field(1.0, x)
    # 1 - 1e-9 rounds to 1.0 in float32: the error says so instead of answering for another time
    with pytest.raises(ValueError, match="float32 t cannot hold"):
        field(torch.tensor(1 - 1e-9, dtype=torch.float32), x.float())
    for t in (1 + 1e-9, -5e-7, 1.01, -0.01, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            field(t, x)
    for s in (0.0, -1e-9, 1.5, float("inf")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            field.at_time_to_go(s, x)
    with pytest.raises(ValueError):
        field(0.5, torch.randn(4, 2, dtype=F64))
    with pytest.raises(ValueError):
        ExactVelocityField(object())


# -- the field near t = 1, against its exact value at the very numbers given ---------------------------------
#
# Each reference is computed in rational arithmetic (fractions.Fraction) from the float values of x, t (or
# s = 1 - t) and the potential's parameters, so it is the field at the inputs as given: what the inputs do
# not hold (a path point rounded to float32) is not charged to the field. Bounds, with u = 2^-53 the float64
# unit roundoff: a target point that is exact (empirical, point, grid knots) leaves two roundings in
# (y - x) / s (1 - t is exact for t >= 1/2), so |error| <= 2u |u_t| per component: tested with 4u. Closed
# forms (Gaussian, sphere) take a few more roundings, each relative to the terms they combine ("scale"):
# tested with 16u x scale. A float32 result adds its own rounding, 2^-24 |u_t|.

U64 = 2.0 ** -53
NEAR_ONE = [1e-7, 1e-9]


def _fractions(v):
    return [[Fraction(e) for e in row] for row in v.tolist()]  # float32 and float64 values convert exactly


def _exact_target_reference(target, x, s):
    """(y - x) / s per component, with ``scale`` = |reference| (a target that is exact: no cancellation error)."""
    out = []
    for y_row, x_row in zip(_fractions(target), _fractions(x)):
        out.append([((y - xi) / s, abs((y - xi) / s)) for y, xi in zip(y_row, x_row)])
    return out


def _gaussian_diagonal_reference(mean, sqrt_diag, x, s):
    """u_k = (m_k + (a_k - 1) x_k) / ((1 - s) a_k + s) for cov = diag(a^2); scale from the terms."""
    m, a = [Fraction(v) for v in mean.tolist()], [Fraction(v) for v in sqrt_diag.tolist()]
    out = []
    for row in _fractions(x):
        denominators = [(1 - s) * ak + s for ak in a]
        out.append([((mk + (ak - 1) * xk) / den, (abs(mk) + abs((ak - 1) * xk)) / den)
                    for mk, ak, xk, den in zip(m, a, row, denominators)])
    return out


def _sphere_reference(radius, x, s):
    """Outside the ball of radius r t (where the OT path runs): u = x (r - |x|) / (|x| s), with
    r - |x| = (r^2 - |x|^2) / (r + |x|) exact and |x| rounded to float64 only where it multiplies (relative
    error u); the scale adds |x_k| (r + |x|) / (|x| s): |x| computed in float64 moves r - |x| by a few
    u (r + |x|). Inside (a path point rounded into the ball): u = x / t, with the same scale (a rounding of
    |x| can cross the boundary |x| = r t, where the two forms meet)."""
    r, t = Fraction(radius), 1 - s
    out = []
    for row in _fractions(x):
        square = sum(v * v for v in row)
        norm = Fraction(math.sqrt(float(square)))
        if square < (r * t) ** 2:
            out.append([(xk / t, abs(xk / t) + abs(xk) * (r + norm) / (norm * s)) for xk in row])
            continue
        gap = (r * r - square) / (r + norm)
        out.append([(xk * gap / (norm * s), abs(xk * gap / (norm * s)) + abs(xk) * (r + norm) / (norm * s))
                    for xk in row])
    return out


def _grid_reference(potential, x, s):
    """Coordinatewise prox ``y_0 + sum_i clamp(z - lam e_i - y_i, 0, y_{i+1} - y_i)`` (z = x / t, lam = s / t)
    in rationals, then (x1 - x) / s. At a knot the scale is |u| (exact target); between knots the field
    is (x - e_i) / t, whose roundings scale with (|x| + |e_i|) / t."""
    t = 1 - s
    out = [[] for _ in range(x.shape[0])]
    for k in range(potential.dim):
        points = [Fraction(v) for v in potential._tensors[f"points{k}"].tolist()]
        edges = [Fraction(v) for v in potential._tensors[f"edges{k}"].tolist()]
        for b, row in enumerate(_fractions(x)):
            xk = row[k]
            z, lam = xk / t, s / t
            ramps = [min(max(z - lam * e - y, Fraction(0)), y_next - y)
                     for e, y, y_next in zip(edges, points, points[1:])]
            u = (points[0] + sum(ramps) - xk) / s
            inside = [i for i, (ramp, y, y_next) in enumerate(zip(ramps, points, points[1:]))
                      if 0 < ramp < y_next - y]
            scale = abs(u) + (abs(xk) + abs(edges[inside[0]])) / t if inside else abs(u)
            out[b].append((u, scale))
    return out


def _near_one_case(name, dtype, s_float):
    """(potential, x on the OT path at t = 1 - s rounded to dtype, reference builder(x, s_exact))."""
    gen = torch.Generator().manual_seed(11)
    if name == "discrete":
        potential = _discrete()
    elif name == "gaussian":  # singular, axis-aligned: sqrt(cov) = diag(2, 1/2, 0) exactly
        potential = GaussianPotential(torch.tensor([0.5, -1.0, 2.0], dtype=F64),
                                      torch.diag(torch.tensor([4.0, 0.25, 0.0], dtype=F64)))
    elif name == "sphere":
        potential = SpherePotential(1.5, dim=3)
    elif name == "circle":  # circle x point: a product of a sphere block and a point block
        potential = POTENTIALS["torus"]()
    elif name == "point":  # near 0, so that a float32 x holds |x - c| ~ 1e-9 without rounding onto c
        potential = PointPotential(torch.tensor([0.5e-3, -1e-3, 2e-3], dtype=F64))
    else:
        potential = POTENTIALS[name]()
    x0 = torch.randn(100, 3, generator=gen, dtype=F64)
    target = potential.transport_map(x0)
    t = 1 - s_float
    x = ((1 - t) * x0 + t * target).to(dtype)

    def reference(s):
        if name == "gaussian":
            return _gaussian_diagonal_reference(potential.mean, torch.tensor([2.0, 0.5, 0.0]), x, s)
        if name == "sphere":
            return _sphere_reference(1.5, x, s)
        if name == "grid":
            return _grid_reference(potential, x, s)
        if name == "circle":
            circle, point = _sphere_reference(1.0, x[:, :2], s), _exact_target_reference(target[:, 2:], x[:, 2:], s)
            return [a + b for a, b in zip(circle, point)]
        return _exact_target_reference(target, x, s)  # discrete, point: exact targets

    return potential, x, reference


def _assert_within(u, reference, dtype, factor):
    bad = []
    for u_row, ref_row in zip(_fractions(u), reference):
        for value, (exact, scale) in zip(u_row, ref_row):
            allowed = factor * Fraction(U64) * scale
            if dtype == torch.float32:
                allowed += Fraction(2) ** -24 * abs(exact)
            if abs(value - exact) > allowed:  # an exact zero (x rounded onto its target) must come out as 0
                bad.append((float(value), float(exact), float(allowed)))
    assert not bad, f"{len(bad)} components beyond the bound; first (value, exact, allowed): {bad[:3]}"


# the factor of u in each bound: 4 for exact targets, 16 for closed forms (see above)
ROUNDINGS = {"discrete": 4, "grid": 4, "point": 4, "gaussian": 16, "sphere": 16, "circle": 16}


@pytest.mark.parametrize("name", ROUNDINGS)
@pytest.mark.parametrize("s", NEAR_ONE)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_field_near_one_equals_the_exact_value(name, s, dtype):
    """t = 1 - 1e-7 and 1 - 1e-9 as Python floats (float64: a float32 t cannot hold them), x in float64
    and float32; the field must be exact to the roundings counted above."""
    potential, x, make_reference = _near_one_case(name, dtype, s)
    t = 1 - s
    u = ExactVelocityField(potential)(t, x)
    assert u.dtype == dtype
    _assert_within(u, make_reference(1 - Fraction(t)), dtype, ROUNDINGS[name])


@pytest.mark.parametrize("name, dtype, s", [(name, dtype, s) for name in ("discrete", "gaussian", "sphere")
                                             for dtype, s in ((torch.float32, 1e-9), (F64, 1e-12), (F64, 1e-20))
                                             if not (name == "sphere" and s == 1e-20)])
def test_field_at_time_to_go_beyond_what_t_can_hold(name, dtype, s):
    """s = 1 - t given directly: 1e-9 in float32 (t would round to 1) and 1e-20 in float64 (t = 1 - 1e-20 is 1.0).
    The sphere stops at 1e-12: at 1e-20 its normal component, O(|x| u / s), has no digit left."""
    potential, x, make_reference = _near_one_case(name, dtype, s)
    u = ExactVelocityField(potential).at_time_to_go(s, x)
    _assert_within(u, make_reference(Fraction(s)), dtype, ROUNDINGS[name] + 2)  # + the rounding of t = 1 - s


def test_float32_time_tensor_is_taken_at_its_own_value():
    """A float32 t is the number it holds (1 - 1e-7 is stored as 1 - 2^-23): the field is exact at that time."""
    potential, x, make_reference = _near_one_case("discrete", torch.float32, 1e-7)
    t = torch.tensor(1 - 1e-7, dtype=torch.float32)
    u = ExactVelocityField(potential)(t, x)
    _assert_within(u, make_reference(1 - Fraction(float(t))), torch.float32, 4)


def test_field_that_overflows_its_dtype_raises():
    potential = PointPotential(torch.tensor([0.0, 0.0, 0.0], dtype=F64))
    x = torch.ones(2, 3, dtype=torch.float16)
    assert torch.isfinite(potential.velocity(x, 1 - 1e-4)).all()  # |u| = 1e4 fits in float16
    with pytest.raises(ValueError, match="does not fit in torch.float16"):
        potential.velocity(x, 1 - 1e-5)  # |u| = 1e5 > 65504
    assert potential.velocity(x.double(), 1 - 1e-5).abs().max() == pytest.approx(1e5, rel=1e-9)


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
