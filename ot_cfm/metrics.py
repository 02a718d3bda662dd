"""Sample-quality metrics: exact 2-Wasserstein distance and normalised path energy."""

from __future__ import annotations

import math

import numpy as np
import ot
import torch

from ot_cfm.couplers.base import centre_and_scale
from ot_cfm.couplers.network_simplex import certificate_tolerance, certify
from ot_cfm.validation import check_batch, check_pair

__all__ = ["wasserstein2", "path_energy", "normalized_path_energy"]

_OPTIMAL, _MAX_ITER_REACHED = 1, 3  # POT's result codes (ot.lp)


def wasserstein2(a: torch.Tensor, b: torch.Tensor, *, max_iterations: int = 10_000_000) -> float:
    """Exact W2 between the empirical measures of a (Na, *shape) and b (Nb, *shape), uniform weights.

    Returns sqrt(min sum P_ij |a_i - b_j|^2) (W2 itself, not its square). The points are centred by one
    common point and divided by one power of two s (``centre_and_scale``; W2 moves with the translation
    not at all and with the scaling by exactly s), so that values of any magnitude that float64 resolves
    work: raw squared costs overflow near 1e154 and POT's network simplex, which compares reduced costs
    with absolute tolerances, is off by a few tenths of a percent at 1e-6 and by a factor 2 at 1e-150.
    POT then solves the float64 costs, and its plan is certified optimal by its duals
    (``network_simplex.certify``). Raises RuntimeError if the solver stops before optimality (raise
    ``max_iterations``) or the certificate fails.
    """
    check_pair(a, b, same_batch_size=False, names=("a", "b"))
    x, y, scale = centre_and_scale(a.detach().reshape(a.shape[0], -1).cpu(), b.detach().reshape(b.shape[0], -1).cpu(),
                                   dtype=torch.float64)
    nx, ny = (x * x).sum(1), (y * y).sum(1)
    cost = (nx[:, None] + ny[None, :] - 2.0 * (x @ y.T)).clamp_min_(0.0)
    wa, wb = np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y))
    plan, log = ot.emd(wa, wb, cost.numpy(), numItermax=max_iterations, log=True)
    if log["result_code"] == _MAX_ITER_REACHED:
        raise RuntimeError(f"POT's network simplex stopped at max_iterations={max_iterations} before the optimum "
                           f"({len(x)} x {len(y)} points); raise max_iterations")
    if log["result_code"] != _OPTIMAL:
        raise RuntimeError(f"POT's network simplex reported '{log['warning']}' (result code {log['result_code']}) on "
                           "finite, centred and scaled costs; expected an optimal plan. Please report the inputs")
    plan = torch.from_numpy(plan)
    reduced = cost.sub_(torch.from_numpy(log["u"])[:, None]).sub_(torch.from_numpy(log["v"])[None, :])
    rows, cols = plan.nonzero(as_tuple=True)
    certify(reduced, rows, cols, certificate_tolerance(nx, ny), solver="POT network simplex (wasserstein2)")
    return scale * math.sqrt(max(float(log["cost"]), 0.0))


def path_energy(trajectory: torch.Tensor, times: torch.Tensor) -> float:
    """Mean kinetic energy E int |dx/dt|^2 dt of trajectories (K, B, *shape) sampled at times (K,).

    Discretised as sum_k |x_{k+1} - x_k|^2 / (t_{k+1} - t_k), exact for straight constant-speed paths.
    """
    check_batch(trajectory, "trajectory", min_ndim=3)
    if times.shape != (trajectory.shape[0],):
        raise ValueError(f"times must have shape ({trajectory.shape[0]},), got {tuple(times.shape)}")
    dt = torch.diff(times.to(trajectory))
    if (dt <= 0).any():
        raise ValueError("times must be strictly increasing")
    steps = torch.diff(trajectory, dim=0).flatten(2).pow(2).sum(-1)  # (K-1, B)
    return float((steps / dt[:, None]).sum(0).mean())


def normalized_path_energy(trajectory: torch.Tensor, times: torch.Tensor, w2_squared: float) -> float:
    """NPE = |path energy - W2^2| / W2^2 (Tong et al. 2024); 0 for the optimal transport flow."""
    if not w2_squared > 0:
        raise ValueError(f"w2_squared must be positive, got {w2_squared}")
    return abs(path_energy(trajectory, times) - w2_squared) / w2_squared
