"""The coupling and regression-target errors of a coupler cell (exact, Sinkhorn, or the population coupling).

The cell's coupler pairs x0 ~ N(0, I_d) with target samples x1 in independent batches of size B, over about
``n_eval`` points (at most ``max_batches`` batches). Against the Brenier map T and the exact field u_t of the
target's potential:

    coupling error    E |x1_B(x0) - T(x0)|^2 / E |x1 - x0|^2     (denominator: independent pairs)
    regression error  E |(x1 - x0) - u_t(x_t)|^2 / E |u_t(x_t)|^2,   x_t = (1 - t) x0 + t x1

each a ratio of sums over all the cell's points. B = inf (batch_size 0) is the population coupling
``SemidiscreteCoupler(potential)``, whose errors are 0 up to round-off. For B = 1 and a Gaussian target N(m, S),
x1 and T(x0) are independent copies of N(m, S): the coupling error is 2 tr(S) / (|m|^2 + tr(S) + d).
"""

from __future__ import annotations

import math

import torch

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.semidiscrete import SemidiscreteCoupler
from ot_cfm.couplers.sinkhorn import SinkhornCoupler
from ot_cfm.data import gaussian_sampler
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm_experiments.batch_size.cells import Cell, ExperimentConfig
from ot_cfm_experiments.batch_size.targets import Target

__all__ = ["measure_coupling"]


def _coupler(cell: Cell, target: Target, config: ExperimentConfig):
    if cell.coupler == "exact":
        return ExactOTCoupler()
    if cell.coupler == "sinkhorn":
        return SinkhornCoupler(epsilon=config.epsilon, max_iters=config.sinkhorn_max_iters)
    if cell.coupler == "population":
        return SemidiscreteCoupler(target.potential)
    raise ValueError(f"unknown coupler {cell.coupler!r}")


@torch.no_grad()
def measure_coupling(cell: Cell, target: Target, config: ExperimentConfig) -> dict:
    """Coupling and regression-target errors of one cell, as ratios of sums over all its batches.

    Returns ``{"n_points", "n_batches", "coupling_error", "regression_error_t<t>" for t in config.times}``.
    """
    generator = cell.generator()
    coupler = _coupler(cell, target, config)
    interpolant = ConditionalFlowMatcher(coupler=None, sigma=0.0)
    source = gaussian_sampler((target.dim,))
    size = config.n_eval if cell.batch_size == 0 else cell.batch_size
    batches = max(1, min(config.max_batches, math.ceil(config.n_eval / size)))
    x0, x1 = source(batches * size, generator), target.sample(batches * size, generator)
    independent = float((x1 - x0).square().sum(dtype=torch.float64))
    pairs = [coupler.pair(a, b, generator=generator) for a, b in zip(x0.split(size), x1.split(size))]
    x0, x1 = torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])
    coupled = float((x1 - target.potential.transport_map(x0)).square().sum(dtype=torch.float64))
    residual, scale = [], []
    for t in config.times:
        s = interpolant.sample(x0, x1, t, generator=generator)
        exact = target.potential.velocity(s.x_t, t)
        residual.append(float((s.u_t - exact).square().sum(dtype=torch.float64)))
        scale.append(float(exact.square().sum(dtype=torch.float64)))
    out = {"n_points": batches * size, "n_batches": batches, "coupling_error": coupled / independent}
    out.update({f"regression_error_t{t:g}": r / s for t, r, s in zip(config.times, residual, scale)})
    return out
