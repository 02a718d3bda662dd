import pytest
import torch

from ot_cfm.sampling import sample


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
