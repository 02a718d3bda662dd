import re
import subprocess
import sys

import pytest
import torch

from ot_cfm.solvers.ode import ADAPTIVE_SOLVERS, DEFAULT_MAX_NFE, FIXED_STEP_SOLVERS, IntegrationError, sample


def test_constant_field_is_exact_for_every_solver():
    x0 = torch.randn(10, 3, dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for solver, steps in [("euler", 1), ("midpoint", 3), ("rk4", 2), ("dopri5", None)]:
        out = sample(lambda t, x: c.expand_as(x), x0, solver=solver, steps=steps)
        torch.testing.assert_close(out.x, x0 + c, rtol=0, atol=1e-12)


def test_euler_nfe_equals_steps_and_rk4_uses_four_per_step():
    x0 = torch.randn(4, 2)
    assert sample(lambda t, x: -x, x0, solver="euler", steps=7).nfe == 7
    assert sample(lambda t, x: -x, x0, solver="rk4", steps=5).nfe == 20


@pytest.mark.parametrize("solver, steps, tol", [("euler", 400, 5e-3), ("rk4", 20, 1e-7), ("dopri5", None, 1e-6)])
def test_linear_field_matches_matrix_exponential(solver, steps, tol):
    a = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -0.5]], dtype=torch.float64)
    x0 = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample(lambda t, x: x @ a.T, x0, solver=solver, steps=steps, atol=1e-9, rtol=1e-9)
    exact = x0 @ torch.linalg.matrix_exp(a).T
    assert (out.x - exact).abs().max() < tol


def test_time_dependent_field_and_error_shrinks_with_steps():
    # dx/dt = 2 t  ->  x(1) = x0 + 1 ; Euler's error is exactly 1 / steps
    x0 = torch.zeros(3, 1, dtype=torch.float64)
    errs = [abs(sample(lambda t, x: 2 * t * torch.ones_like(x), x0, solver="euler", steps=k).x[0, 0].item() - 1)
            for k in (1, 2, 4, 8)]
    assert errs == pytest.approx([1.0, 0.5, 0.25, 0.125])


def test_trajectory_shapes_and_image_shaped_states():
    x0 = torch.randn(5, 1, 4, 4)
    out = sample(lambda t, x: -x, x0, solver="euler", steps=4, return_trajectory=True)
    assert out.trajectory.shape == (5, 5, 1, 4, 4) and out.times.shape == (5,)
    torch.testing.assert_close(out.trajectory[0], x0)
    torch.testing.assert_close(out.trajectory[-1], out.x)
    adaptive = sample(lambda t, x: -x, x0, solver="dopri5", return_trajectory=True, trajectory_points=11)
    assert adaptive.trajectory.shape[0] == 11
    torch.testing.assert_close(adaptive.x, x0 * torch.exp(torch.tensor(-1.0)), rtol=1e-4, atol=1e-4)


def test_bad_arguments_raise():
    x0 = torch.randn(3, 2)
    with pytest.raises(ValueError, match="fixed-step"):
        sample(lambda t, x: x, x0, solver="euler")
    with pytest.raises(ValueError, match="integer steps"):
        sample(lambda t, x: x, x0, solver="euler", steps=2.7)
    with pytest.raises(ValueError, match="adaptive"):
        sample(lambda t, x: x, x0, solver="dopri5", steps=10)
    with pytest.raises(ValueError, match="solver must be"):
        sample(lambda t, x: x, x0, solver="leapfrog", steps=2)
    with pytest.raises(ValueError, match="field returned shape"):
        sample(lambda t, x: x[:, :1], x0, solver="euler", steps=1)
    with pytest.raises(ValueError, match="NaN"):
        sample(lambda t, x: x, torch.full((3, 2), float("inf")), solver="euler", steps=1)


@pytest.mark.parametrize("solver, steps", [("euler", 3), ("rk4", 2), ("dopri5", None), ("tsit5", None)])
def test_field_receives_a_zero_dim_time_in_the_states_dtype(solver, steps):
    seen = []

    def field(t, x):
        seen.append((t.ndim, t.dtype))
        return -x

    sample(field, torch.randn(4, 2, dtype=torch.float64), solver=solver, steps=steps)
    assert set(seen) == {(0, torch.float64)}


def test_sampling_imports_neither_lightning_nor_torchvision():
    # torchdyn.core (NeuralODE) imports pytorch_lightning -> torchmetrics -> torchvision, whose registry
    # wheel does not load with a CPU torch; the functional solver needs neither.
    code = ("import sys, torch, ot_cfm; ot_cfm.sample(lambda t, x: -x, torch.randn(3, 2)); "
            "print(sorted(m for m in ('pytorch_lightning', 'lightning', 'torchmetrics', 'torchvision') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"sampling imported {out.stdout.strip()}"


# Faults that made adaptive solvers loop forever: each must raise, within a few hundred evaluations at most.

@pytest.mark.parametrize("solver", ADAPTIVE_SOLVERS + FIXED_STEP_SOLVERS)
def test_nan_field_raises_at_the_first_evaluation(solver):
    calls = []

    def field(t, x):
        calls.append(float(t))
        return torch.full_like(x, float("nan"))

    steps = None if solver in ADAPTIVE_SOLVERS else 4
    with pytest.raises(IntegrationError, match=r"field returned NaN or inf at t = 0 \(field evaluation 1,"):
        sample(field, torch.randn(4, 2), solver=solver, steps=steps)
    assert calls == [0.0]


@pytest.mark.parametrize("solver", ADAPTIVE_SOLVERS)
def test_inf_field_raises_naming_the_time(solver):
    def field(t, x):
        return torch.full_like(x, float("inf")) if t > 0.3 else -x

    with pytest.raises(IntegrationError, match="field returned NaN or inf") as err:
        sample(field, torch.randn(4, 2, dtype=torch.float64), solver=solver)
    t_bad = float(re.search(r"at t = ([0-9.e+-]+)", str(err.value)).group(1))
    assert 0.3 < t_bad <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_time_blow_up_stops_at_the_blow_up_time(dtype):
    # dx/dt = x^2, x(0) = 10  ->  x(t) = 1 / (0.1 - t): infinite at t = 0.1
    x0 = torch.full((3, 2), 10.0, dtype=dtype)
    with pytest.raises(IntegrationError, match="step size collapsed") as err:
        sample(lambda t, x: x**2, x0, solver="dopri5")
    t_stop = float(re.search(r"at t = ([0-9.e+-]+)", str(err.value)).group(1))
    assert t_stop == pytest.approx(0.1, abs=1e-5)


@pytest.mark.parametrize("name, value", [("atol", 0.0), ("rtol", 0.0), ("atol", -1e-5), ("rtol", float("nan")),
                                         ("atol", float("inf"))])
def test_non_positive_or_non_finite_tolerances_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number > 0"):
        sample(lambda t, x: -x, torch.randn(3, 2), solver="dopri5", **{name: value})
    with pytest.raises(ValueError, match="atol must be a finite number > 0"):
        sample(lambda t, x: -x, torch.randn(3, 2), solver="tsit5", atol=0.0, rtol=0.0)


@pytest.mark.parametrize("max_nfe", [50, 200])
def test_stiff_field_stops_after_exactly_max_nfe_evaluations(max_nfe):
    # dopri5 is stable only for steps below about 3.3e-6 on dx/dt = -1e6 x: about 1.8 million evaluations to t = 1.
    calls = []

    def stiff(t, x):
        calls.append(1)
        return -1e6 * x

    with pytest.raises(IntegrationError, match=f"max_nfe = {max_nfe} field evaluations and reached only t = "):
        sample(stiff, torch.randn(4, 2, dtype=torch.float64), solver="dopri5", max_nfe=max_nfe)
    assert len(calls) == max_nfe


def test_default_max_nfe_bounds_adaptive_solves():
    calls = []

    def stiff(t, x):
        calls.append(1)
        return -1e6 * x

    with pytest.raises(IntegrationError, match=f"max_nfe = {DEFAULT_MAX_NFE} "):
        sample(stiff, torch.randn(2, 1), solver="tsit5")
    assert len(calls) == DEFAULT_MAX_NFE >= 10_000


def test_max_nfe_allows_exactly_the_evaluations_needed():
    needed = sample(lambda t, x: -x, torch.randn(3, 2), solver="dopri5").nfe
    assert sample(lambda t, x: -x, torch.randn(3, 2), solver="dopri5", max_nfe=needed).nfe == needed
    with pytest.raises(IntegrationError, match=f"max_nfe = {needed - 1} "):
        sample(lambda t, x: -x, torch.randn(3, 2), solver="dopri5", max_nfe=needed - 1)


def test_bad_max_nfe_is_refused():
    with pytest.raises(ValueError, match="fixed-step: it uses exactly steps x stages"):
        sample(lambda t, x: -x, torch.randn(3, 2), solver="euler", steps=4, max_nfe=100)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_nfe must be an integer >= 1"):
            sample(lambda t, x: -x, torch.randn(3, 2), solver="dopri5", max_nfe=bad)


def test_state_overflow_in_a_fixed_step_solve_raises():
    # A finite field whose first Euler step overflows float32 (max 3.4e38): 3e38 + 0.5 * 3e38 = inf.
    with pytest.raises(IntegrationError, match="state became NaN or inf at t = 0.5 after 1 field evaluations"):
        sample(lambda t, x: torch.full_like(x, 3e38), torch.full((2, 1), 3e38), solver="euler", steps=2)
