"""ODE sampling: integrate a field v(t, x) from noise at t = 0 to data at t = 1 with torchdyn's solvers.

Adaptive solvers go through torchdyn's functional ``odeint`` (``torchdyn.numerics``, which imports neither
pytorch_lightning nor torchvision). Fixed-step solvers call torchdyn's steppers in a loop of their own, with
the times and steps ``odeint`` would take (the same results, bit for bit), keeping only the current state
unless the trajectory is asked for: ``odeint`` stores every state (B x D per step) and checks each step's
time against the whole grid (time quadratic in ``steps``). Every integration ends: a non-finite state or
field value, a step size that no longer advances t, or more than ``max_nfe`` field evaluations (adaptive
solvers) raises ``IntegrationError`` instead of looping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ot_cfm.utils.validation import check_batch

__all__ = ["SampleResult", "IntegrationError", "sample", "FIXED_STEP_SOLVERS", "ADAPTIVE_SOLVERS",
           "DEFAULT_MAX_NFE", "MAX_FIXED_STEPS"]

FIXED_STEP_SOLVERS = ("euler", "midpoint", "rk4")
ADAPTIVE_SOLVERS = ("dopri5", "tsit5")
# A well-trained flow-matching field needs tens to a few hundred evaluations with dopri5 at the default
# tolerances (50 on the default toy task); a stored trajectory of 101 points adds at most 6 per point.
# 10,000 leaves a wide margin for rough or badly trained fields and still ends in seconds to minutes.
DEFAULT_MAX_NFE = 10_000
#: most steps of a fixed-step solver. Euler's error at 10^6 steps is about 1e-6 of the field's variation, as
#: fine as float32 samples resolve, and a float32 time grid stops advancing near 1.7e7 steps on [0, 1] (ulp(1)
#: = 1.2e-7); an adaptive solver reaches 1e-8 in hundreds of evaluations. The time grid, steps + 1 scalars
#: (8 MB in float64 at the cap), is all that grows with steps when no trajectory is kept.
MAX_FIXED_STEPS = 1_000_000


class IntegrationError(RuntimeError):
    """The ODE solve cannot finish: non-finite values, a collapsed step size or too many evaluations."""


@dataclass(frozen=True)
class SampleResult:
    """x: final states (B, *shape); nfe: field evaluations; times (K,) and trajectory (K, B, *shape) on request."""

    x: torch.Tensor
    nfe: int
    times: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None


class _GuardedField:
    """Calls field(t, x) for torchdyn, counts evaluations and stops on non-finite values or too many calls."""

    def __init__(self, field, solver: str, max_nfe: int | None, t_span: tuple[float, float]):
        self.field, self.solver, self.max_nfe, self.t_span = field, solver, max_nfe, t_span
        self.nfe = 0
        self.last_t = float(t_span[0])

    def __call__(self, t, x, args=None):
        t = t.reshape(()) if isinstance(t, torch.Tensor) and t.numel() == 1 else t
        if self.max_nfe is not None and self.nfe >= self.max_nfe:
            raise IntegrationError(
                f"{self.solver!r} used max_nfe = {self.max_nfe} field evaluations and reached only t = "
                f"{self.last_t:.6g} of [{self.t_span[0]}, {self.t_span[1]}]: the field is too stiff, too rough or "
                "blows up for these tolerances; raise max_nfe, loosen atol/rtol or use a fixed-step solver")
        self.last_t = float(t)
        if not torch.isfinite(x).all():
            raise IntegrationError(
                f"the state became NaN or inf at t = {self.last_t:.6g} after {self.nfe} field evaluations "
                f"with {self.solver!r}: the solution blows up or a step overflowed; expected finite states")
        self.nfe += 1
        v = self.field(t, x)
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"field returned shape {got} for x of shape {tuple(x.shape)}; expected equal shapes")
        if not torch.isfinite(v).all():
            raise IntegrationError(
                f"the field returned NaN or inf at t = {self.last_t:.6g} (field evaluation {self.nfe}, "
                f"solver {self.solver!r}) for finite states; expected finite values")
        return v


class _GuardedSolver:
    """Wraps a torchdyn adaptive solver: refuses a step size that is not finite or no longer advances t.

    torchdyn's adaptive loop (``_adaptive_odeint``) keeps retrying smaller steps while t stays fixed; once
    t + dt rounds to t it would loop forever. The wrapper sees every step's dt, so it stops there.
    """

    def __init__(self, solver, name: str):
        self._solver, self._name = solver, name

    def __getattr__(self, attr):  # order, stepping_class, safety, min_factor, max_factor, sync_device_dtype
        if attr in ("_solver", "_name"):
            raise AttributeError(attr)
        return getattr(self._solver, attr)

    def step(self, f, x, t, dt, k1=None, args=None):
        if not bool(torch.isfinite(dt).all()) or not bool((t + dt > t).all()):
            raise IntegrationError(
                f"{self._name!r} step size collapsed to dt = {float(dt):.3g} at t = {float(t):.6g}: it no longer "
                f"advances t in {x.dtype}; the field likely blows up near this time, or it changes faster than "
                f"{x.dtype} can resolve (a finite but stiff field may still solve with float64 x0 or looser "
                "atol/rtol)")
        return self._solver.step(f, x, t, dt, k1=k1, args=args)


def _check_tolerance(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 for adaptive solvers, got {value!r}")
    return float(value)


def sample(field, x0: torch.Tensor, *, solver: str = "dopri5", steps: int | None = None, atol: float = 1e-5,
           rtol: float = 1e-5, return_trajectory: bool = False, trajectory_points: int = 101,
           t_span: tuple[float, float] = (0.0, 1.0), enable_grad: bool = False,
           max_nfe: int | None = None) -> SampleResult:
    """Solve dx/dt = field(t, x) from x(t_span[0]) = x0 to t_span[1] with torchdyn's ``odeint``.

    The Butcher tableau is built in x0's dtype, so float64 states get float64 coefficients.

    Args:
        field: callable field(t, x) -> (B, *shape), t a 0-d tensor in x0's dtype; a model or
            ``proximal.ExactVelocityField`` (which has no value at t = 1: integrate it with "euler" or
            "midpoint", which never evaluate there).
        x0: initial states (B, *shape), finite.
        solver: fixed-step "euler", "midpoint", "rk4" (need ``steps``; ``steps`` x stages evaluations)
            or adaptive "dopri5", "tsit5" (use ``atol``/``rtol``; ``steps`` must be None).
        atol, rtol: tolerances of the adaptive solvers, finite and > 0.
        return_trajectory: keep the states at every step (fixed) or at ``trajectory_points`` evenly
            spaced times (adaptive; the solver then also stops at those times, which raises the NFE).
            Without it a fixed-step solve keeps one state at a time: its memory does not grow with ``steps``
            (but for the steps + 1 grid times; at most ``MAX_FIXED_STEPS`` steps).
        enable_grad: keep the autograd graph (off by default: sampling is inference; the graph holds every step).
        max_nfe: most field evaluations an adaptive solver may use (default ``DEFAULT_MAX_NFE`` = 10,000;
            a well-trained field needs tens to hundreds). Fixed-step solvers use exactly ``steps`` x stages
            evaluations, so it must stay None for them.

    Returns:
        SampleResult: ``x`` (B, *shape), ``nfe`` (field evaluations), and with ``return_trajectory`` also
        ``times`` (K,) and ``trajectory`` (K, B, *shape), K = steps + 1 or ``trajectory_points``.

    Raises:
        ValueError: a bad argument (unknown solver, steps given or missing, tolerances not finite and > 0,
            max_nfe not an integer >= 1 or given to a fixed-step solver, x0 not a finite batch, the field
            returning another shape).
        IntegrationError: (a ``RuntimeError``) the field returned NaN or inf (raised at once, naming t and
            the NFE so far); a state became NaN or inf; the adaptive step size stopped advancing t (finite-
            time blow-up, tolerances too tight for the dtype); more than ``max_nfe`` evaluations.
    """
    check_batch(x0, "x0")
    if solver in FIXED_STEP_SOLVERS:
        if steps is None or isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"solver {solver!r} is fixed-step: give an integer steps >= 1, got {steps}")
        if steps > MAX_FIXED_STEPS:
            raise ValueError(f"steps = {steps} exceeds MAX_FIXED_STEPS = {MAX_FIXED_STEPS:,} for solver {solver!r}: "
                             "expected fewer steps (Euler at 10^6 steps is as fine as float32 resolves); for an "
                             "accurate reference use an adaptive solver (dopri5) with small atol/rtol")
        if max_nfe is not None:
            raise ValueError(f"solver {solver!r} is fixed-step: it uses exactly steps x stages field evaluations, "
                             f"so max_nfe (for adaptive solvers) must be None, got {max_nfe!r}")
        grid = torch.linspace(t_span[0], t_span[1], int(steps) + 1, dtype=x0.dtype)
    elif solver in ADAPTIVE_SOLVERS:
        if steps is not None:
            raise ValueError(f"solver {solver!r} is adaptive: its steps follow atol/rtol, so steps must be None")
        atol, rtol = _check_tolerance(atol, "atol"), _check_tolerance(rtol, "rtol")
        if max_nfe is None:
            max_nfe = DEFAULT_MAX_NFE
        elif isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 1:
            raise ValueError(f"max_nfe must be an integer >= 1, got {max_nfe!r}")
        if return_trajectory and (isinstance(trajectory_points, bool) or not isinstance(trajectory_points, int)
                                  or trajectory_points < 2):
            raise ValueError(f"trajectory_points must be an integer >= 2, got {trajectory_points!r}")
        grid = torch.linspace(t_span[0], t_span[1], trajectory_points if return_trajectory else 2, dtype=x0.dtype)
    else:
        raise ValueError(f"solver must be one of {FIXED_STEP_SOLVERS + ADAPTIVE_SOLVERS}, got {solver!r}")
    if not all(math.isfinite(float(s)) for s in t_span) or float(t_span[0]) == float(t_span[1]):
        raise ValueError(f"t_span must be two different finite times, got {t_span}")
    # lazy: importing torchdyn takes seconds. torchdyn.numerics imports neither pytorch_lightning nor torchvision.
    from torchdyn.numerics import odeint
    from torchdyn.numerics.solvers.ode import str_to_solver

    guarded = _GuardedField(field, solver, max_nfe, (float(t_span[0]), float(t_span[1])))
    stepper = str_to_solver(solver, x0.dtype)  # the tableau in the states' dtype (torchdyn's default: float32)
    grid = grid.to(device=x0.device)
    with torch.set_grad_enabled(enable_grad):
        if solver in ADAPTIVE_SOLVERS:  # its times are the grid's, negated for a reversed t_span: grid is returned
            _, states = odeint(guarded, x0, grid, _GuardedSolver(stepper, solver), atol=atol, rtol=rtol)
            x = states[-1]
        else:
            x, states = _fixed_steps(guarded, x0, grid, stepper, return_trajectory)
    if not torch.isfinite(x).all():
        raise IntegrationError(f"integration with {solver!r} produced NaN or inf in its final states after "
                               f"{guarded.nfe} field evaluations; expected finite states")
    if return_trajectory:
        return SampleResult(x=x, nfe=guarded.nfe, times=grid, trajectory=states)
    return SampleResult(x=x, nfe=guarded.nfe)


def _fixed_steps(field, x: torch.Tensor, grid: torch.Tensor, stepper,
                 keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(final state, (K, B, *shape) states at every time of ``grid`` (K,) or None unless ``keep``): torchdyn's
    fixed-step loop (``_fixed_odeint``), the same times t_{k+1} = t_k + dt_k with dt_k = grid[k + 1] - t_k and
    the same ``stepper.step``, with one state alive between steps when nothing is kept. A reversed grid
    (t1 < t0) steps with dt < 0: odeint's negated field and times give the same values, negation being exact."""
    x, grid = stepper.sync_device_dtype(x, grid)  # the tableau on x's device
    t, dt = grid[0], grid[1] - grid[0]
    states = [x] if keep else None
    for k in range(1, len(grid)):
        _, x, _ = stepper.step(field, x, t, dt)
        t = t + dt
        if k < len(grid) - 1:
            dt = grid[k + 1] - t
        if keep:
            states.append(x)
    return x, torch.stack(states) if keep else None
