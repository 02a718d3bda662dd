"""SDE sampling with a flow and a score: dx = [v(t, x) + g^2 / 2 s(t, x)] dt + g dW, g = sigma, with torchsde.

For a flow v that generates marginals p_t and the score s = grad log p_t, this SDE has the same marginals
as the ODE dx = v dt (the drift g^2 / 2 s cancels the diffusion's spreading in the Fokker-Planck equation),
so a Schrodinger-bridge CFM model (``FlowAndScore`` trained with
``SchrodingerBridgeConditionalFlowMatcher(sigma)``) samples with g = sigma (Tong et al. 2024, "Simulation-free
Schrodinger bridges via score and flow matching").

The Brownian path is torchsde's ``BrownianInterval`` on x0's device and dtype, seeded from the caller's
generator (one draw), so equal generators give equal samples and the global RNG is never used.
"""

from __future__ import annotations

import math

import torch

from ot_cfm.solvers.ode import IntegrationError, SampleResult
from ot_cfm.utils.validation import check_batch

__all__ = ["SDE_SOLVERS", "sample_sde"]

#: torchsde's fixed-step Ito solvers for diagonal noise: Euler-Maruyama (strong order 0.5), Milstein (1.0 here:
#: the noise is additive) and SRK (strong order 1.5 for additive noise; needs space-time Levy area)
SDE_SOLVERS = ("euler", "milstein", "srk")


class _FlowScoreSDE:
    """torchsde's SDE protocol on flattened states (B, D): drift f = v + g^2 / 2 s, diagonal diffusion g = sigma."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, field, score, sigma: float, shape: tuple[int, ...]):
        self.field, self.score, self.sigma, self.shape = field, score, sigma, shape
        self.nfe = 0

    def _call(self, fn, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = fn(t, x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{name} returned shape {got} for x of shape {tuple(x.shape)}; expected equal shapes")
        return out

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(y).all():
            raise IntegrationError(f"the state became NaN or inf at t = {float(t):.6g} after {self.nfe} drift "
                                   "evaluations: the SDE blows up or a step overflowed; expected finite states")
        self.nfe += 1
        x = y.reshape(self.shape)
        drift = self._call(self.field, "field", t, x) + (self.sigma**2 / 2) * self._call(self.score, "score", t, x)
        return drift.reshape(y.shape)

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, self.sigma)


def sample_sde(field, score, x0: torch.Tensor, *, sigma: float, steps: int, generator: torch.Generator,
               solver: str = "euler", t_span: tuple[float, float] = (0.0, 1.0), return_trajectory: bool = False,
               enable_grad: bool = False) -> SampleResult:
    """Integrate dx = [field(t, x) + sigma^2 / 2 score(t, x)] dt + sigma dW from x(t_span[0]) = x0 to t_span[1].

    Args:
        field, score: callables (t, x) -> (B, *shape), t a 0-d tensor; for a ``FlowAndScore`` model pass
            ``model, model.score``.
        x0: initial states (B, *shape), finite; the solve runs on its device and dtype.
        sigma: the diffusion g, finite and > 0 (the sigma of the Schrodinger-bridge matcher).
        steps: number of fixed steps of size (t1 - t0) / steps, an integer >= 1.
        generator: seeds the Brownian path (one int drawn from it); on any device.
        solver: one of ``SDE_SOLVERS``.
        return_trajectory: keep the states at every step.
        enable_grad: keep the autograd graph (off by default: sampling is inference).

    Returns:
        SampleResult: ``x`` (B, *shape), ``nfe`` (drift evaluations, each one call of field and one of score:
        steps + 1 for "euler", torchsde evaluating the drift once to check its shape),
        and with ``return_trajectory`` also ``times`` (steps + 1,) and ``trajectory`` (steps + 1, B, *shape).

    Raises:
        ValueError: a bad argument (sigma, steps, solver, generator, t_span; x0 not a finite batch; a callable
            returning another shape). IntegrationError: a state became NaN or inf.
    """
    check_batch(x0, "x0")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma (the diffusion g) must be a finite number > 0, got {sigma!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if solver not in SDE_SOLVERS:
        raise ValueError(f"solver must be one of {SDE_SOLVERS}, got {solver!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (it seeds the Brownian path), got {type(generator).__name__}")
    t0, t1 = float(t_span[0]), float(t_span[1])
    if not (math.isfinite(t0) and math.isfinite(t1) and t0 < t1):
        raise ValueError(f"t_span must be two finite times t0 < t1, got {t_span}")
    import torchsde  # lazy, as torchdyn in ot_cfm.solvers.ode: importing it takes a second

    flat = x0.reshape(x0.shape[0], -1)
    entropy = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    dt = (t1 - t0) / steps
    brownian = torchsde.BrownianInterval(t0=t0, t1=t1, size=flat.shape, dtype=x0.dtype, device=x0.device,
                                         entropy=entropy, dt=dt,
                                         levy_area_approximation="space-time" if solver == "srk" else "none")
    grid = torch.linspace(t0, t1, steps + 1 if return_trajectory else 2, dtype=x0.dtype, device=x0.device)
    sde = _FlowScoreSDE(field, score, float(sigma), tuple(x0.shape))
    with torch.set_grad_enabled(enable_grad):
        states = torchsde.sdeint(sde, flat, grid, bm=brownian, method=solver, dt=dt)
    states = states.reshape(grid.shape[0], *x0.shape)
    if not torch.isfinite(states[-1]).all():
        raise IntegrationError(f"SDE integration with {solver!r} produced NaN or inf in its final states after "
                               f"{sde.nfe} drift evaluations; expected finite states")
    if return_trajectory:
        return SampleResult(x=states[-1], nfe=sde.nfe, times=grid, trajectory=states)
    return SampleResult(x=states[-1], nfe=sde.nfe)
