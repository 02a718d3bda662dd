"""Sample-quality metrics: Wasserstein distances (W1, W2; exact and entropic) and normalised path energy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ot_cfm.couplers.base import centre_and_scale
from ot_cfm.couplers.network_simplex import certificate_tolerance, certify
from ot_cfm.utils.validation import check_batch, check_pair

__all__ = ["wasserstein", "wasserstein2", "path_energy", "normalized_path_energy"]

_OPTIMAL, _MAX_ITER_REACHED = 1, 3  # POT's result codes (ot.lp)


def _centred_costs(a: torch.Tensor, b: torch.Tensor, power: int) -> tuple[torch.Tensor, float, float]:
    """(cost, tol, scale) for the flattened a (Na, *shape), b (Nb, *shape) centred by one common
    point and divided by one power of two s (``centre_and_scale``): cost = |a'_i - b'_j|^power (Na, Nb),
    float64 on the CPU, and the certificate tolerance in its units."""
    check_pair(a, b, same_batch_size=False, names=("a", "b"))
    x, y, scale = centre_and_scale(a.detach().reshape(a.shape[0], -1).cpu(), b.detach().reshape(b.shape[0], -1).cpu(),
                                   dtype=torch.float64)
    nx, ny = (x * x).sum(1), (y * y).sum(1)
    cost = (nx[:, None] + ny[None, :] - 2.0 * (x @ y.T)).clamp_min_(0.0)
    if power == 1:  # |a - b| <= |a| + |b|: the tolerance follows the norms, not their squares
        return cost.sqrt_(), certificate_tolerance(nx.sqrt(), ny.sqrt()), scale
    return cost, certificate_tolerance(nx, ny), scale


def _exact_cost(cost: torch.Tensor, tol: float, max_iterations: int, caller: str) -> float:
    """min sum P_ij C_ij over couplings of uniform weights, by POT's network simplex, certified by its duals."""
    n0, n1 = cost.shape
    wa, wb = np.full(n0, 1.0 / n0), np.full(n1, 1.0 / n1)
    import ot  # here, not at module level: importing POT loads scikit-learn (about a second)
    plan, log = ot.emd(wa, wb, cost.numpy(), numItermax=max_iterations, log=True)
    if log["result_code"] == _MAX_ITER_REACHED:
        raise RuntimeError(f"POT's network simplex stopped at max_iterations={max_iterations} before the optimum "
                           f"({n0} x {n1} points); raise max_iterations")
    if log["result_code"] != _OPTIMAL:
        raise RuntimeError(f"POT's network simplex reported '{log['warning']}' (result code {log['result_code']}) on "
                           "finite, centred and scaled costs; expected an optimal plan. Please report the inputs")
    plan = torch.from_numpy(plan)
    reduced = cost.sub_(torch.from_numpy(log["u"])[:, None]).sub_(torch.from_numpy(log["v"])[None, :])
    rows, cols = plan.nonzero(as_tuple=True)
    certify(reduced, rows, cols, tol, solver=f"POT network simplex ({caller})")
    return max(float(log["cost"]), 0.0)


def _sinkhorn_cost(cost: torch.Tensor, reg: float, max_iterations: int) -> float:
    """sum_ij P_ij C_ij for the entropic plan P of uniform weights (POT's ``sinkhorn``), in C's units; reg in the
    same units. RuntimeError unless P is finite and meets both marginals to 1e-6 in L1."""
    n0, n1 = cost.shape
    wa, wb = np.full(n0, 1.0 / n0), np.full(n1, 1.0 / n1)
    import ot  # here, not at module level: importing POT loads scikit-learn (about a second)
    # an underflowing kernel divides by zero and POT warns of it, or of stopping early: the check below reports both
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = ot.sinkhorn(wa, wb, cost.numpy(), reg, numItermax=max_iterations, stopThr=1e-9)
    error = float(np.abs(plan.sum(1) - wa).sum() + np.abs(plan.sum(0) - wb).sum()) if np.isfinite(plan).all() else math.inf
    if not error <= 1e-6:
        raise RuntimeError(f"Sinkhorn's plan misses its marginals by {error:.2e} (L1) at reg={reg:.3e} in units of the "
                           "centred, scaled cost: the kernel exp(-C / reg) underflows or max_iterations was reached; "
                           "expected a coupling: raise reg (or max_iterations)")
    return float((plan * cost.numpy()).sum())


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
    cost, tol, scale = _centred_costs(a, b, 2)
    return scale * math.sqrt(_exact_cost(cost, tol, max_iterations, "wasserstein2"))


def wasserstein(x0: torch.Tensor, x1: torch.Tensor, method: str | None = None, reg: float = 0.05, power: int = 2, *,
                max_iterations: int = 10_000_000) -> float:
    """W_p between the empirical measures of x0 (N0, *shape) and x1 (N1, *shape), uniform weights, p = ``power``.

    torchcfm's ``wasserstein`` (same arguments and value, W_p itself, not its p-th power):

        W_p = (sum_ij P_ij |x0_i - x1_j|^p)^(1/p),  p = 1 or 2 (Euclidean distance to the power p),

    with P the exact optimal plan (``method="exact"`` or None) or the entropic one (``method="sinkhorn"``:
    P minimises sum P C + reg sum P (log P - 1) over couplings, ``reg`` absolute, in the units of |x0 - x1|^p,
    as torchcfm's; the value is the transport cost of that plan, without the entropy term, POT's ``sinkhorn2``).

    Both work on the points centred by one common point and divided by one power of two s
    (``centre_and_scale``); the cost becomes C / s^p and, for Sinkhorn, reg reg / s^p, which leaves
    the plan unchanged and keeps the costs representable at any scale. Exact: POT's network simplex,
    certified by its duals (as ``wasserstein2``, which equals ``wasserstein(x0, x1, power=2)``).
    Sinkhorn: POT's ``sinkhorn`` (torchcfm's method; marginal tolerance 1e-9, at most ``max_iterations``
    iterations, torchcfm's 1e7), whose plan must meet both marginals to 1e-6 in L1: where the kernel
    exp(-C / reg) underflows (costs beyond about 700 reg) torchcfm returns whatever the iterations left,
    5.8e-8 for a W2 of 3.56 at reg = 0.01 on 20 x 25 unit-scale points; here that raises RuntimeError.
    POT's log-domain variant avoids the underflow but took 1 ms per iteration there and stalled at a
    marginal error of 4e-7 after 2e5 iterations, so it is not used.

    Raises ValueError for an unknown method, a power other than 1 or 2, reg not finite and > 0, or bad batches.
    """
    if method not in (None, "exact", "sinkhorn"):
        raise ValueError(f"method must be 'exact' (or None) or 'sinkhorn', got {method!r}")
    if power not in (1, 2) or isinstance(power, bool):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    if method == "sinkhorn" and (isinstance(reg, bool) or not isinstance(reg, (int, float))
                                 or not math.isfinite(reg) or reg <= 0):
        raise ValueError(f"reg must be a finite number > 0 for method='sinkhorn', got {reg!r}")
    cost, tol, scale = _centred_costs(x0, x1, power)
    unit = scale ** power
    if method == "sinkhorn":
        value = _sinkhorn_cost(cost, reg / unit, max_iterations)
    else:
        value = _exact_cost(cost, tol, max_iterations, "wasserstein")
    return scale * (max(value, 0.0) if power == 1 else math.sqrt(max(value, 0.0)))


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
