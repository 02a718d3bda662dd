"""Exact assignment for the squared Euclidean cost by multiscale column generation.

For equal batches x (B, d) and y (B, d) the optimal permutation minimises sum_i C_{i, sigma(i)},
C_ij = |x_i - y_j|^2. POT's network simplex on all B^2 arcs is the reference; at low dimension it is
also the fastest library solver there (scipy's shortest augmenting paths are 3x to 5x slower at d = 2,
``benchmarks/results/assignment_warm_start.md``). This module solves the same problem on a sparse candidate
graph and proves optimality on the full one:

1. Solve the problem on every second point (recursively; POT's dense network simplex at ``base``
   points or fewer), extend its row duals u to every column by the c-transform
   v_j = min_i (C_ij - u_i), then u_i = min_j (C_ij - v_j).
2. Candidate arcs: the ``neighbours`` smallest reduced costs R_ij = C_ij - u_i - v_j of every row and
   of every column, plus the diagonal (a perfect matching, so the sparse problem is feasible).
3. POT's network simplex on the candidate arcs returns a permutation and duals (u, v). If
   R_ij >= -tol on the full B x B grid and R <= tol on the permutation, (u, v) is dual feasible and
   complementary to it, so by LP duality its cost sum_i C_{i, sigma(i)} is within 2 B tol of the
   optimum (``network_simplex.certify``; tol = 1e-10 (max |x|^2 + max |y|^2), at least 1e-10: above
   the rounding of POT's duals and of R, far below any cost gap that matters). Otherwise the
   ``neighbours`` most negative arcs of every violating row join the candidates and step 3 repeats (at
   most ``_MAX_ROUNDS`` times, then POT's dense solver, whose answer is certified in the same way).

Everything runs on the batches centred and scaled by ``base.centre_and_scale`` (each on its own mean
where its offset exceeds its spread, both divided by one power of two; the optimal permutation does
not change): POT's pivoting compares reduced costs with absolute tolerances, and on raw points scaled
by 1e-8 to 1e-6 it stopped 0.4 to 130 % above the optimum (B = 512 and 1024, d = 2), while under a
common offset of 1e8 the float64 cost itself loses the points' differences (20 % and more above it).
The tolerance above is then relative to the data's extent. If no certificate can be obtained,
RuntimeError: a plan is never returned unproven.

Reduced costs come from one GEMM of augmented factors, R = [x, |x|^2 - u, 1] @ [-2 y, 1, |y|^2 - v]^T,
on the input's device; only the candidate arcs cross to the CPU solver. Measured on the couplers
benchmark's batches (one thread, ``benchmarks/results/couplers_crossover.md``): 1.6x to 2.6x faster
than POT's dense solve at B = 1024 and 2048 for d = 2 to 4, no faster at B = 256 (hence ``base``).
"""

from __future__ import annotations

import scipy.sparse
import torch

from ot_cfm.couplers.base import buffer_view, centre_and_scale
from ot_cfm.couplers.network_simplex import certificate_tolerance, certify, network_simplex

__all__ = ["multiscale_assignment"]

_MAX_ROUNDS = 50  # column-generation rounds per level before falling back to the dense solver
_SOLVER = "multiscale_assignment (POT network simplex)"


def _reduced_costs(x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
    """R_ij = p_i + q_j - 2 <x_i, y_j>, shape (Bx, By), as one matrix product of augmented factors,
    written into ``out`` (a work-buffer view, see ``buffer_view``)."""
    ones_x = torch.ones_like(p)[:, None]
    ones_y = torch.ones_like(q)[:, None]
    return torch.matmul(torch.cat([x, p[:, None], ones_x], 1), torch.cat([-2.0 * y, ones_y, q[:, None]], 1).T, out=out)


def _dense_level(x, y, nx, ny, work, tol: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(permutation, u, v) from POT's dense solver; all three on x's device. With ``tol``, the answer
    is certified (``certify``; RuntimeError if it fails), else (a coarse level) only used for its duals."""
    n = x.shape[0]
    cost = _reduced_costs(x, y, nx, ny, out=buffer_view(work[0], (n, n))).clamp_min_(0.0)
    plan, u, v = network_simplex(cost.cpu().numpy())
    perm, u, v = (torch.from_numpy(t).to(x.device) for t in (plan.argmax(1), u, v))
    if tol is not None:
        certify(cost.sub_(u[:, None]).sub_(v[None, :]), torch.arange(n, device=x.device), perm, tol, solver=_SOLVER)
    return perm, u, v


def _solve_level(x, y, nx, ny, neighbours: int, base: int, tol: float, work: torch.Tensor, top: bool = True):
    """(permutation (B,), u (B,), v (B,)): an optimal assignment of C = nx + ny - 2 x y^T and duals
    certifying it, R = C - u - v >= -tol everywhere and R <= tol on the permutation (``certify``). A
    coarse level (``top`` False) only provides duals, and skips the certificate when solved densely.
    ``work``: two flat buffers of at least B^2 entries, shared by every level (a level uses them after
    its sub-level)."""
    n = x.shape[0]
    if n <= base:
        return _dense_level(x, y, nx, ny, work, tol if top else None)
    _, u_half, _ = _solve_level(x[::2], y[::2], nx[::2], ny[::2], neighbours, base, tol, work, top=False)
    half = u_half.shape[0]
    v = _reduced_costs(x[::2], y, nx[::2] - u_half, ny, out=buffer_view(work[0], (half, n))).amin(0)
    reduced = _reduced_costs(x, y, nx, ny - v, out=buffer_view(work[0], (n, n)))
    u = reduced.amin(1)
    reduced -= u[:, None]

    k = min(neighbours, n)
    idx = torch.arange(n, device=x.device)
    by_row = torch.topk(reduced, k, dim=1, largest=False, sorted=False).indices
    transposed = _reduced_costs(y, x, ny - v, nx - u, out=buffer_view(work[1], (n, n)))
    by_col = torch.topk(transposed, k, dim=1, largest=False, sorted=False).indices
    arcs = torch.cat([idx[:, None] * n + by_row, by_col * n + idx[:, None], (idx * (n + 1))[:, None]], 1)
    arcs = torch.unique(arcs.reshape(-1))
    for _ in range(_MAX_ROUNDS):
        rows, cols = arcs // n, arcs % n
        weights = reduced[rows, cols] + u[rows] + v[cols]
        sparse_cost = scipy.sparse.coo_array(
            (weights.cpu().numpy(), (rows.cpu().numpy(), cols.cpu().numpy())), shape=(n, n))
        plan, u, v = network_simplex(sparse_cost)
        u, v = torch.from_numpy(u).to(x.device), torch.from_numpy(v).to(x.device)
        plan = plan.tocoo()
        on = plan.data > 0.5 / n
        perm = torch.zeros(n, dtype=torch.long)  # a row without an arc of mass 1/n fails the final check
        perm[torch.from_numpy(plan.row[on]).long()] = torch.from_numpy(plan.col[on]).long()
        perm = perm.to(x.device)
        reduced = _reduced_costs(x, y, nx - u, ny - v, out=reduced)
        violating = certify(reduced, idx, perm, tol, solver=_SOLVER, strict=False)
        if violating.numel() == 0:
            return perm, u, v
        worst = torch.topk(reduced[violating], k, dim=1, largest=False, sorted=False)
        new = (violating[:, None] * n + worst.indices)[worst.values < -tol]
        arcs = torch.cat([arcs, new])
    return _dense_level(x, y, nx, ny, work, tol if top else None)


def multiscale_assignment(x: torch.Tensor, y: torch.Tensor, *, neighbours: int = 48,
                          base: int = 256) -> torch.Tensor:
    """The optimal assignment sigma (B,) minimising sum_i |x_i - y_sigma(i)|^2, for x, y of shape (B, d).

    Certified exact (LP duality, see the module docstring): on the batches centred on their means and
    divided by one power of two (``centre_and_scale``), its cost is within 2 B tol of the optimum,
    tol = 1e-10 max(max_i |x_i|^2 + max_j |y_j|^2, 1) there, a few 1e-10 of the batches' squared
    extent per pair; RuntimeError if no certificate is obtained.
    ``neighbours``: candidate arcs per row and per column; ``base``: batch size from which down POT's
    dense solver is used. Computes in float64 on x's device; returns indices on it.
    """
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (B, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError("the batch is empty")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("x and y must not contain NaN or inf")
    if neighbours < 1 or base < 1:
        raise ValueError(f"neighbours and base must be positive, got {neighbours} and {base}")
    x, y, _ = centre_and_scale(x.detach(), y.detach(), separately=True, dtype=torch.float64)
    nx, ny = (x * x).sum(1), (y * y).sum(1)
    tol = certificate_tolerance(nx, ny)
    work = torch.empty(2, x.shape[0] ** 2, dtype=torch.float64, device=x.device)
    perm = _solve_level(x, y, nx, ny, neighbours, base, tol, work)[0]
    if torch.bincount(perm, minlength=x.shape[0]).max() != 1:
        raise RuntimeError("POT emd returned an equal-size plan that is not a permutation")
    return perm
