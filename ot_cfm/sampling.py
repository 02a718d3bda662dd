"""ODE sampling: integrate a field v(t, x) from noise at t = 0 to data at t = 1 with torchdyn."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch
from torch import nn

from ot_cfm.validation import check_batch

__all__ = ["SampleResult", "sample", "FIXED_STEP_SOLVERS", "ADAPTIVE_SOLVERS"]

FIXED_STEP_SOLVERS = ("euler", "midpoint", "rk4")
ADAPTIVE_SOLVERS = ("dopri5", "tsit5")


@dataclass(frozen=True)
class SampleResult:
    """x: final states (B, *shape); nfe: field evaluations; times (K,) and trajectory (K, B, *shape) on request."""

    x: torch.Tensor
    nfe: int
    times: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None


class _CountedField(nn.Module):
    """Adapts field(t, x) to torchdyn's call signature and counts evaluations."""

    def __init__(self, field):
        super().__init__()
        self.field = field
        self.nfe = 0

    def forward(self, t, x, args=None):
        self.nfe += 1
        v = self.field(t, x)
        if v.shape != x.shape:
            raise ValueError(f"field returned shape {tuple(v.shape)} for x of shape {tuple(x.shape)}; expected equal shapes")
        return v


def sample(field, x0: torch.Tensor, *, solver: str = "dopri5", steps: int | None = None, atol: float = 1e-5,
           rtol: float = 1e-5, return_trajectory: bool = False, trajectory_points: int = 101,
           t_span: tuple[float, float] = (0.0, 1.0), enable_grad: bool = False) -> SampleResult:
    """Solve dx/dt = field(t, x) from x(t_span[0]) = x0 to t_span[1] with torchdyn's NeuralODE.

    Args:
        field: callable field(t, x) -> (B, *shape), t a 0-d tensor; a model or ``proximal.ExactVelocityField``.
        x0: initial states (B, *shape).
        solver: fixed-step "euler", "midpoint", "rk4" (need ``steps``) or adaptive "dopri5", "tsit5"
            (use ``atol``/``rtol``; ``steps`` must be None).
        return_trajectory: keep the states at every step (fixed) or at ``trajectory_points`` evenly
            spaced times (adaptive; the solver then also stops at those times, which raises the NFE).
        enable_grad: keep the autograd graph (off by default: sampling is inference).

    Returns:
        SampleResult with the final states and the number of field evaluations (NFE).
    """
    check_batch(x0, "x0")
    if solver in FIXED_STEP_SOLVERS:
        if steps is None or int(steps) != steps or steps < 1:
            raise ValueError(f"solver {solver!r} is fixed-step: give an integer steps >= 1, got {steps}")
        grid = torch.linspace(t_span[0], t_span[1], int(steps) + 1, dtype=x0.dtype)
    elif solver in ADAPTIVE_SOLVERS:
        if steps is not None:
            raise ValueError(f"solver {solver!r} is adaptive: its steps follow atol/rtol, so steps must be None")
        grid = torch.linspace(t_span[0], t_span[1], trajectory_points if return_trajectory else 2, dtype=x0.dtype)
    else:
        raise ValueError(f"solver must be one of {FIXED_STEP_SOLVERS + ADAPTIVE_SOLVERS}, got {solver!r}")
    from torchdyn.core import NeuralODE  # lazy: importing torchdyn takes seconds
    from torchdyn.numerics.solvers.ode import str_to_solver

    counted = _CountedField(field)
    # torchdyn's defaults (1e-3) leave fixed-step solvers silent; ours would trigger its warning.
    tolerances = dict(atol=atol, rtol=rtol) if solver in ADAPTIVE_SOLVERS else dict(atol=1e-3, rtol=1e-3)
    with contextlib.redirect_stdout(io.StringIO()):  # torchdyn prints a notice for parameter-free fields
        # NeuralODE would build the Butcher tableau in float32; build it in the states' dtype.
        node = NeuralODE(counted, solver=str_to_solver(solver, x0.dtype), sensitivity="autograd", **tolerances)
    grid = grid.to(device=x0.device, dtype=x0.dtype)
    with torch.set_grad_enabled(enable_grad):
        times, states = node(x0, grid)
    if not torch.isfinite(states[-1]).all():
        raise RuntimeError(f"integration with {solver!r} produced NaN or inf after {counted.nfe} evaluations")
    if return_trajectory:
        return SampleResult(x=states[-1], nfe=counted.nfe, times=times, trajectory=states)
    return SampleResult(x=states[-1], nfe=counted.nfe)
