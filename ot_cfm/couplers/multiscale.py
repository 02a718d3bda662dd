"""Exact assignment for the squared Euclidean cost, warm-started from a hierarchy of averaged batches.

For equal batches x (B, d) and y (B, d) the optimal permutation minimises sum_i |x_i - y_sigma(i)|^2, or
equally sum_i C_{i, sigma(i)} with C = -<x_i, y_j> (the norms add the same total to every permutation).
Shortest augmenting paths (``ot_cfm.couplers.augmenting_paths``) solve it exactly and return duals
u, v; they are fast when they start from column duals v close to the optimal ones, and slow from
scratch at low dimension (scipy: 9 ms at B = 256, d = 2, against 1 ms from the optimal duals,
``benchmarks/results/assignment_warm_start.md``). This module gets such duals from coarser problems:

1. Each batch is put in k-d order (``kd_order``): split at a power of two along the widest coordinate,
   recursively, so that consecutive aligned blocks of 2^l points are spatial clusters.
2. Level l + 1 averages consecutive pairs: its points are the means of the level-l pairs, its cost the
   2 x 2 block means of the level-l cost (-<x, y> is bilinear, so the two agree), down to ``base``
   points, which are solved from scratch over all arcs.
3. From level l + 1's row duals U, every column of level l gets v_j = min_c (Cbar_cj - U_c), Cbar_cj the
   cost of the pair mean c to point j (the c-transform); level l is then solved on its k smallest reduced
   costs per row and column from those duals, certified on its full grid (``sparse_assignment``).

Averaging, not subsampling: the duals of a half-sized subsample differ from the full problem's by the
sampling noise of the half sample, an error at every spatial scale, which left augmenting paths across
the whole batch (B = 1024, d = 2: 35,000 Dijkstra steps at the top level); the duals of pair means differ
only at the scale of a pair (13,500 steps, 2.5x less time, CPU time with one thread). Above
``LEVELS_UP_TO_DIM`` pair means are no clusters, and the sparse solver starts from v = 0.

Everything runs on the batches centred by ``base.centre_and_scale`` (each on its own mean where its
offset exceeds its spread; the optimal permutation does not change; divided by their power of two only
where float64 needs it), in float64. The answer is certified on the full cost of the top level:
R_ij = C_ij - v_j - u_i >= -tol everywhere and R <= tol on the permutation, so by LP duality its cost is
within 2 B tol of the optimum, tol = 2 ``network_simplex.CERTIFICATE_TOL`` max_ij |C_ij| (1e-10 of
the cost's range, at any scale: above the rounding of the duals, far below any cost gap that matters). When the
sparse rounds do not certify (``_MAX_ROUNDS``) the dense solver finishes from the current duals; a
permutation that still fails its certificate raises RuntimeError instead of being returned.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ot_cfm.couplers.base import centre_and_scale
from ot_cfm.couplers.network_simplex import CERTIFICATE_TOL

__all__ = ["multiscale_assignment", "dense_below", "LEVELS_UP_TO_DIM"]

_MAX_ROUNDS = 20  # rounds of added arcs per level before the dense solver finishes that level
_SOLVER = "multiscale_assignment (shortest augmenting paths)"


def dense_below(dim: int) -> int:
    """The batch size up to which the dense solver works alone (and the size of the coarsest level), for
    flattened dimension dim.

    CPU time with one thread on the couplers benchmark's batches: at d = 2 levels down to 32 points are as
    fast as the dense solver at B = 64 (0.09 ms) and 2x to 3x faster from B = 96 (0.3 ms against 0.6 to
    1.0 ms), also 15 % faster than levels down to 64 at B = 128 to 256; at d = 32 and 784 levels win only
    above 256 (B = 256, d = 32: dense 2.6 ms, levels 3.0 ms; B = 1024: 126 ms against 37 ms), and at d = 784
    the dense solver takes 1.6 ms at B = 256, the sparse one from v = 0 1.8 ms."""
    return 32 if dim <= 4 else 256


#: largest flattened dimension with coarse levels; above it the sparse solver starts from v = 0. At d = 784
#: the k-d order alone cost 4.5 ms per batch at B = 512, and pair means of 784-dimensional points are no
#: cluster: the sparse solver from v = 0 took 6.8 ms at B = 512 and 19 ms at B = 1024, from coarse duals 7.8 and
#: 28 ms (without the order); at d = 32 the levels win (B = 1024: 32 ms against 39 ms)
LEVELS_UP_TO_DIM = 64


def _solve(C: np.ndarray, base: int, neighbours: int, tol: float, levels: bool, top: bool = True):
    """(sigma, u, v) for the cost C (n, n): dense from scratch up to ``base`` points, else sparse from the
    duals of the pair-averaged problem (``levels``, C in k-d order) or from v = 0; the top level is
    certified (RuntimeError otherwise), the coarse ones only provide duals."""
    # numba loads here, not at module level: importing it costs about half a second
    from ot_cfm.couplers.augmenting_paths import dense_assignment, sparse_assignment, violations
    from ot_cfm.couplers.kd_pyramid import c_transform, coarsen

    n = C.shape[0]
    if n <= base:
        sigma, u, v = dense_assignment(C, np.zeros(n))
    else:
        if levels:
            pairs, coarse = coarsen(C)
            v = c_transform(pairs, _solve(coarse, base, neighbours, tol, levels, top=False)[1])
        else:
            v = np.zeros(n)
        sigma, u, v, ok = sparse_assignment(C, v, neighbours, tol, _MAX_ROUNDS)
        if not ok:  # exact from any duals: then the certificate below decides
            sigma, u, v = dense_assignment(C, v)
    if top:
        _, lowest, on_plan = violations(C, u, v, sigma, tol, 1, np.empty(n, np.int64), np.empty(n, np.int64))
        if lowest < -tol or on_plan > tol or np.bincount(sigma, minlength=n).max() != 1:
            raise RuntimeError(
                f"{_SOLVER} returned a permutation that fails its optimality certificate: the reduced costs "
                f"C - u - v reach {lowest:.3e} over all arcs and {on_plan:.3e} on the permutation, expected >= "
                f"-{tol:.1e} and <= {tol:.1e} (units of the centred, scaled cost). Please report the batch that "
                "caused this; ExactOTCoupler(backend='scipy') solves without it.")
    return sigma, u, v


def assign(x: torch.Tensor, y: torch.Tensor, neighbours: int = 6, base: int | None = None) -> torch.Tensor:
    """``multiscale_assignment`` for batches already checked (finite, same shape (B, d))."""
    from ot_cfm.couplers.kd_pyramid import kd_order

    n = x.shape[0]
    base = dense_below(x.shape[1]) if base is None else base
    # the assignment does not depend on the scale: the batches are divided by it only where their products
    # could leave float64's range (each division is a pass over both batches)
    a, b, scale = centre_and_scale(x.detach(), y.detach(), separately=True, dtype=torch.float64, scaled=False)
    if not 2.0 ** -200 < scale < 2.0 ** 200:
        a, b = a.div_(scale), b.div_(scale)
    levels = n > base and x.shape[1] <= LEVELS_UP_TO_DIM
    if levels:  # k-d order, so that the pairs averaged by the coarse levels are neighbours
        rows, cols = (torch.from_numpy(kd_order(t.cpu().numpy())) for t in (a, b))
        a, b = a[rows.to(a.device)], b[cols.to(b.device)]
    cost = torch.mm(a.neg_(), b.T).cpu()
    low, high = torch.aminmax(cost)
    if not math.isfinite(float(high) - float(low)):  # the sampled scale missed an outlier row: its products overflowed
        extent = max(float(a.abs().max()), float(b.abs().max()))
        a, b = a.div_(extent), b.div_(extent)  # entries in [-1, 1]: |C_ij| <= d (a is negated already)
        cost = torch.mm(a, b.T).cpu()
        low, high = torch.aminmax(cost)
    tol = CERTIFICATE_TOL * 2.0 * max(-float(low), float(high))
    sigma = torch.from_numpy(_solve(cost.numpy(), base, neighbours, tol, levels)[0])
    if levels:  # back from the k-d orders
        sigma = torch.empty_like(sigma).index_put_((rows,), cols[sigma])
    return sigma.to(x.device)


def multiscale_assignment(x: torch.Tensor, y: torch.Tensor, *, neighbours: int = 6,
                          base: int | None = None) -> torch.Tensor:
    """The optimal assignment sigma (B,) minimising sum_i |x_i - y_sigma(i)|^2, for x, y of shape (B, d).

    Certified exact (LP duality, see the module docstring): on the batches centred on their means
    (``centre_and_scale``), its cost is within 2 B tol of the optimum, tol = 2e-10 max_ij |<x_i, y_j>|
    there; RuntimeError if no certificate is obtained.
    ``neighbours``: candidate arcs per row and per column (6: at B = 1024, 4 took up to 1.3x as long at
    d = 32 and 8 up to 1.15x as long at d = 2 and 32, CPU times within 20 % noise); ``base``: the batch
    size up to which the dense solver works alone (``dense_below(d)`` by default). Computes in float64,
    the cost on x's device and the assignment on the CPU; returns indices on x's device.
    """
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (B, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("the batch is empty")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("x and y must not contain NaN or inf")
    if neighbours < 1 or (base is not None and base < 1):
        raise ValueError(f"neighbours and base must be positive, got {neighbours} and {base}")
    return assign(x, y, neighbours, base)
