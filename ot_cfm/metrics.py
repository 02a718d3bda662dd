"""Sample-quality metrics: exact 2-Wasserstein distance and normalised path energy."""

from __future__ import annotations

import numpy as np
import ot
import torch

from ot_cfm.validation import check_batch, check_pair

__all__ = ["wasserstein2", "path_energy", "normalized_path_energy"]


def wasserstein2(a: torch.Tensor, b: torch.Tensor, *, max_iterations: int = 10_000_000) -> float:
    """Exact W2 between the empirical measures of a (Na, *shape) and b (Nb, *shape), uniform weights.

    Solves the discrete OT problem with POT's network simplex on float64 squared Euclidean costs
    and returns sqrt(min sum P_ij |a_i - b_j|^2) (W2 itself, not its square). Raises RuntimeError
    if the solver stops before optimality.
    """
    check_pair(a, b, same_batch_size=False, names=("a", "b"))
    x = a.detach().reshape(a.shape[0], -1).to("cpu", torch.float64).numpy()
    y = b.detach().reshape(b.shape[0], -1).to("cpu", torch.float64).numpy()
    cost = ot.dist(x, y, metric="sqeuclidean")
    wa, wb = np.full(len(x), 1.0 / len(x)), np.full(len(y), 1.0 / len(y))
    value, log = ot.emd2(wa, wb, cost, numItermax=max_iterations, log=True)
    if log["result_code"] != 1:
        raise RuntimeError(f"POT emd2 did not reach the optimum ({log['warning']}); raise max_iterations")
    return float(np.sqrt(max(value, 0.0)))


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
