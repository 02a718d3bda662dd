"""The exact OT-CFM vector field of a Brenier potential, and the error of a model against it.

``ExactVelocityField(potential)`` is a module called as ``field(t, x)`` like any learned model;
``field_error`` measures ``E |v(t, x_t) - u_t(x_t)|^2 / E |u_t(x_t)|^2`` on the OT path
``x_t = (1 - t) x0 + t T(x0)``, x0 ~ N(0, I), where ``u_t(x_t) = T(x0) - x0``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ot_cfm.utils.validation import as_time_tensor, check_batch, check_time
from proximal.potential import BrenierPotential

__all__ = ["ExactVelocityField", "FieldErrorReport", "field_error"]


class ExactVelocityField(torch.nn.Module):
    """``field(t, x) = u_t(x)`` of ``potential``; x (B, *shape) with prod(shape) = potential.dim,
    t a float, a 0-d or a (B,) tensor in [0, 1). Returns a tensor shaped like x, in x's dtype.

    Times are read in float64 and the field is computed in float64 (``BrenierPotential.velocity``
    gives the accuracy per target and dtype): nothing is clamped, so the answer at t = 1 - 1e-9
    is the field at that time. Near t = 1 pass t as a Python float or a float64 tensor (a float32
    t cannot hold 1 - t below 6e-8), or call ``field.at_time_to_go(s, x)`` with s = 1 - t.

    t = 1 raises ValueError: u_t(x) = (x1 - x) / (1 - t) has no value there (every source point of
    a cell arrives at one target point, each with its own velocity). Integrate the exact field with
    a fixed-step solver that never evaluates t = 1 ("euler", "midpoint": exact on these straight
    paths, Euler in one step), or stop at t = 1 - s and finish with ``potential.recover_target``.
    Adaptive solvers and "rk4" evaluate at the end time and so raise.
    """

    def __init__(self, potential: BrenierPotential) -> None:
        super().__init__()
        if not isinstance(potential, BrenierPotential):
            raise ValueError(f"potential must be a BrenierPotential, got {type(potential).__name__}")
        self.potential = potential

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x, "x")
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.potential.dim:
            raise ValueError(f"x has {flat.shape[1]} features per sample, the potential has dim {self.potential.dim}")
        return flat

    def forward(self, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.potential.velocity(self._flat(x), t).reshape(x.shape)

    def at_time_to_go(self, s: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``u_t(x)`` at ``t = 1 - s`` for a time to go s (float, 0-d or (B,)) in (0, 1]."""
        return self.potential.velocity_at_time_to_go(self._flat(x), s).reshape(x.shape)


@dataclass(frozen=True)
class FieldErrorReport:
    """Relative field error per time: ``errors[k] = E|v - u|^2 / E|u|^2`` at ``times[k]``."""

    times: torch.Tensor
    errors: torch.Tensor


@torch.no_grad()
def field_error(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], potential: BrenierPotential,
                times: Sequence[float] | torch.Tensor, n: int, *, generator: torch.Generator | None = None,
                source: torch.Tensor | None = None, shape: tuple[int, ...] | None = None) -> FieldErrorReport:
    """Relative squared error of ``model(t, x)`` against the exact field, on the OT path.

    Args:
        model: a field ``v(t, x)``; t is passed as a (n,) tensor, x as (n, dim) or (n, *shape).
        potential: the target's Brenier potential.
        times: times in [0, 1).
        n: number of source samples x0 ~ N(0, I) (drawn with ``generator`` on its device); unused with ``source``.
        source: optional (N, dim) source samples used instead of drawing (fixes N, device and dtype).
        shape: per-sample shape the model expects (default (dim,)).
    """
    if source is None:
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        device = generator.device if generator is not None else None
        source = torch.randn(int(n), potential.dim, generator=generator, device=device)
    check_batch(source, "source")
    if source.ndim != 2 or source.shape[1] != potential.dim:
        raise ValueError(f"source must have shape (n, {potential.dim}), got {tuple(source.shape)}")
    times = torch.as_tensor(times, dtype=source.dtype, device=source.device).reshape(-1)
    if times.numel() == 0:
        raise ValueError("times must contain at least one time")
    check_time(times, times, include_high=False)
    shape = (potential.dim,) if shape is None else tuple(shape)
    target = potential.transport_map(source)
    exact = target - source
    scale = exact.square().sum(1).mean()
    errors = []
    for t in times:
        xt = (1 - t) * source + t * target
        v = model(as_time_tensor(t, source), xt.reshape(source.shape[0], *shape))
        if tuple(v.shape) != (source.shape[0], *shape):
            raise ValueError(f"model returned shape {tuple(v.shape)} for input of shape "
                             f"{(source.shape[0], *shape)}; a field returns its input's shape")
        errors.append((v.reshape(xt.shape) - exact).square().sum(1).mean() / scale)
    return FieldErrorReport(times=times, errors=torch.stack(errors))
