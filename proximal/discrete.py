"""Brenier potential of an empirical target ``sum_j w_j delta_{y_j}`` (semi-discrete OT).

``phi(x) = max_j <x, y_j> - g_j`` with dual weights ``g``; the Laguerre cell of ``y_j`` is
``C_j = {x : j maximises <x, y_j> - g_j}``. On the OT path the target point reached through
``x`` at time t is ``y_{j*}`` with (one matrix product per batch, exact for t in [0, 1])

    j*(x, t) = argmin_j  2 (1 - t) g_j - 2 <x, y_j> + t |y_j|^2.

Scores are computed in blocks over both the batch and the support, so memory stays bounded
for supports of 10^5 to 10^6 points.
"""

from __future__ import annotations

import math
import warnings

import torch

from ot_cfm.utils.validation import check_batch
from proximal.potential import BrenierPotential, time_to_go

__all__ = ["DiscreteBrenierPotential"]


def _has_duplicate_rows(points: torch.Tensor) -> bool:
    """Whether two rows of (N, d) ``points`` are equal: hash by a projection, compare only collisions."""
    direction = torch.linspace(1.0, 2.0, points.shape[1], dtype=torch.float64, device=points.device).sqrt()
    keys, order = (points.to(torch.float64) @ direction).sort()
    tied = keys[1:] == keys[:-1]
    if not bool(tied.any()):
        return False
    candidates = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    candidates[1:] |= tied
    candidates[:-1] |= tied
    chosen = points[order[candidates]]
    return torch.unique(chosen, dim=0).shape[0] < chosen.shape[0]


def _project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of (B, N) ``v`` onto the probability simplex."""
    u, _ = v.sort(dim=1, descending=True)
    cumulative = u.cumsum(1) - 1
    ranks = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    count = (u - cumulative / ranks > 0).sum(1, keepdim=True)
    theta = cumulative.gather(1, count - 1) / count.to(v.dtype)
    return (v - theta).clamp_min(0)


def _solve_on_support(p: torch.Tensor, y: torch.Tensor, z: torch.Tensor, linear: torch.Tensor,
                      rounds: int = 4) -> torch.Tensor:
    """Minimiser of ``<linear, q> + |Y^T q - z|^2 / 2`` over ``sum q = 1`` with q supported on the
    largest entries of p (at most 2 (d + 2) of them: an optimal support generically has d + 1),
    dropping negative entries and re-solving ``rounds`` times (the caller checks optimality). Rows of (B, N)."""
    k = min(int((p > 0).sum(1).max()), 2 * (y.shape[1] + 2))
    value, index = p.topk(k, dim=1)
    active = value > 0
    rows = torch.arange(p.shape[0], device=p.device)[:, None]
    for _ in range(rounds):
        weight = active.to(p.dtype)
        ys = y[index] * weight[..., None]
        kkt = torch.zeros(p.shape[0], k + 1, k + 1, dtype=p.dtype, device=p.device)
        kkt[:, :k, :k] = ys @ ys.transpose(1, 2) + torch.diag_embed(1 - weight)
        kkt[:, :k, k] = weight
        kkt[:, k, :k] = weight
        rhs = torch.cat([((ys @ z[:, :, None])[..., 0] - linear[rows, index]) * weight,
                         torch.ones_like(weight[:, :1])], 1)
        q = (torch.linalg.pinv(kkt) @ rhs[..., None])[:, :k, 0] * weight
        active = active & (q > 0)
    q = q.clamp_min(0)
    q = q / q.sum(1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return torch.zeros_like(p).scatter(1, index, q)


class DiscreteBrenierPotential(BrenierPotential):
    """``phi(x) = max_j <x, y_j> - g_j`` for support ``y`` (N, d), weights ``w`` (N,), duals ``g`` (N,).

    Args:
        support: (N, d) distinct finite points ``y_j``.
        weights: (N,) non-negative masses summing to 1 (within 1e-5, or the eps of support's dtype if
            larger: 1e-3 for float16), or None for uniform ``1/N``; stored in support's dtype.
        dual_weights: (N,) finite dual weights ``g_j`` (e.g. from ``fit_discrete_potential``).
        block_size: largest number of (sample, support point) scores held at once; bounds
            the memory of every batched search to about ``block_size`` entries.

    Computations run on the input's device and dtype (the parameters are cast once and cached).
    """

    def __init__(self, support: torch.Tensor, weights: torch.Tensor | None, dual_weights: torch.Tensor, *,
                 block_size: int = 2 ** 24) -> None:
        check_batch(support, "support")
        if support.ndim != 2:
            raise ValueError(f"support must have shape (N, d), got {tuple(support.shape)}")
        n, dim = support.shape
        super().__init__(dim)
        if _has_duplicate_rows(support):
            raise ValueError("support contains duplicate points; merge them and add their weights")
        if weights is None:
            weights = torch.full((n,), 1.0 / n, dtype=support.dtype, device=support.device)
        weights = torch.as_tensor(weights, dtype=support.dtype, device=support.device)
        if weights.shape != (n,):
            raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights must be finite and non-negative")
        # weights that sum to 1 still sum to 1 within eps / 2 once rounded to the support's dtype
        # (relative rounding <= eps / 2 each): float16 (eps ~1e-3) needs more than the float32 / float64 1e-5
        tolerance = max(1e-5, torch.finfo(support.dtype).eps)
        total = float(weights.sum(dtype=torch.float64))
        if abs(total - 1.0) > tolerance:
            hint = "" if torch.finfo(support.dtype).bits > 16 else (
                f"; {support.dtype} rounds weights below 6e-5 coarsely (subnormal): use float32 or float64 support")
            raise ValueError(f"weights must sum to 1 (tolerance {tolerance:.3g} for {support.dtype}), "
                             f"got {total}{hint}")
        dual_weights = torch.as_tensor(dual_weights, dtype=support.dtype, device=support.device)
        if dual_weights.shape != (n,):
            raise ValueError(f"dual_weights must have shape ({n},), got {tuple(dual_weights.shape)}")
        if not torch.isfinite(dual_weights).all():
            raise ValueError("dual_weights contain NaN or inf")
        if int(block_size) != block_size or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = int(block_size)
        self._register("support", support)
        self._register("weights", weights)
        self._register("dual_weights", dual_weights)
        self._register("squared_norms", support.square().sum(1))

    @property
    def support(self) -> torch.Tensor:
        """(N, d) support points ``y_j``."""
        return self._tensors["support"]

    @property
    def weights(self) -> torch.Tensor:
        """(N,) target masses ``w_j``."""
        return self._tensors["weights"]

    @property
    def dual_weights(self) -> torch.Tensor:
        """(N,) dual weights ``g_j``."""
        return self._tensors["dual_weights"]

    @property
    def n_support(self) -> int:
        """Number N of support points."""
        return self.support.shape[0]

    def _blocks(self, batch: int) -> tuple[int, int]:
        """(rows, columns) of one score block, rows * columns <= block_size."""
        cols = min(self.n_support, max(self.block_size // min(batch, 4096), math.isqrt(self.block_size)))
        return min(batch, max(1, self.block_size // cols)), cols

    def _lifted_support(self, x: torch.Tensor) -> torch.Tensor:
        """``[-2 y_j; g_j; |y_j|^2]`` as a (d + 2, N) matrix on x's device and dtype (cached; the
        transpose of a contiguous (N, d + 2) matrix, so that column blocks are contiguous)."""
        key = ("lifted_support", x.device, x.dtype)
        if key not in self._cache:
            y = self.support
            lifted = torch.cat([-2 * y, self.dual_weights[:, None], y.square().sum(1)[:, None]], 1)
            self._cache[key] = lifted.to(device=x.device, dtype=x.dtype).contiguous().T
        return self._cache[key]

    @torch.no_grad()
    def assign(self, x: torch.Tensor, t: float | torch.Tensor = 0.0) -> torch.Tensor:
        """Index ``j*(x, t)`` of the support point reached through x at time t: (B, d) -> (B,) long.

        ``t`` is a float or (B,) tensor in [0, 1], read in float64; t = 0 gives the Laguerre cell of
        x, t = 1 the nearest support point. Scores ``[x, 2(1-t), t] @ [-2 y; g; |y|^2]``, one product
        per block, in x's dtype: in float32, points within about ``2^-24 (|x| |y| + |y|^2)`` of a tie
        between two cells (a cell boundary) may get the neighbouring one.
        """
        self._check_points(x)
        return self._assign(x, time_to_go(t, x, allow_one=True))

    @torch.no_grad()
    def _assign(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``assign`` for float64 times to go s (B,) in [0, 1]."""
        support = self._lifted_support(x)
        lifted = torch.cat([x, (2 * s).to(x.dtype)[:, None], (1 - s).to(x.dtype)[:, None]], 1)
        rows, cols = self._blocks(x.shape[0])
        if cols >= self.n_support:  # one column block: argmin per row block, no merging
            return torch.cat([(lifted[r:r + rows] @ support).argmin(1) for r in range(0, x.shape[0], rows)])
        best_val = torch.full((x.shape[0],), torch.inf, dtype=x.dtype, device=x.device)
        best_idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        buffer = torch.empty(rows * cols, dtype=x.dtype, device=x.device)  # reused by every block
        for c in range(0, self.n_support, cols):
            block = support[:, c:c + cols]
            for r in range(0, x.shape[0], rows):
                out = buffer[:min(rows, x.shape[0] - r) * block.shape[1]].view(-1, block.shape[1])
                val, idx = torch.mm(lifted[r:r + rows], block, out=out).min(1)
                better = val < best_val[r:r + rows]
                best_val[r:r + rows] = torch.where(better, val, best_val[r:r + rows])
                best_idx[r:r + rows] = torch.where(better, idx + c, best_idx[r:r + rows])
        return best_idx

    def transport_map(self, x0: torch.Tensor) -> torch.Tensor:
        """``T(x0) = y_j`` for the Laguerre cell ``C_j`` containing x0: (B, d) -> (B, d)."""
        return self._param("support", x0)[self.assign(x0, 0.0)]

    def recover_target(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Hard rule ``y_{j*(x, t)}``, exact on the support of mu_t for every t in [0, 1] (t = 1 allowed).

        Off that support it is a piecewise-constant extension; ``prox_conjugate`` gives the
        continuous one. x: (B, d), t: float or (B,). Returns (B, d).
        """
        return self._param("support", x)[self.assign(x, t)]

    def _recover_target(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``recover_target`` for float64 times to go s (B,)."""
        return self._param("support", x)[self._assign(x, s)]

    def _velocity64(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``(y_{j*} - x) / s`` in float64: ``j*`` in x's dtype, then the exact (stored) ``y_{j*}``
        minus x, divided by the time to go: no rounding of y, x or 1 - t to x's dtype before the
        cancellation near t = 1."""
        index = self._assign(x, s)
        x = x.to(torch.float64)
        return (self._param("support", x)[index] - x) / s[:, None]

    def prox_conjugate(self, z: torch.Tensor, lam: float | torch.Tensor, *, tol: float | None = None,
                       max_iter: int = 20_000) -> torch.Tensor:
        """Convex-envelope prox ``prox_{lam phi^*}(z) = Y^T p`` with p solving, over the simplex,

            min_p  lam <p, g> + |Y^T p - z|^2 / 2

        (``phi^*`` is the convex envelope of ``y_j -> g_j`` on conv(Y), +inf outside). Solved by
        FISTA with gradient restarts, each tenth iterate polished by an exact solve on its support;
        stops when the Frank-Wolfe gap certifies ``|result - exact| <= tol`` for every row (default ``10 sqrt(eps) (1 + max_j |y_j|)``);
        warns if ``max_iter`` is reached first. Memory: about ``block_size`` entries per block of rows.
        z: (B, d); lam: positive float or (B,). Returns (B, d).
        """
        self._check_points(z, "z")
        lam = self._check_lam(lam, z)
        y = self._param("support", z)
        g = self._param("dual_weights", z)
        if tol is None:
            scale = 1 + float(self._param("squared_norms", z).max().sqrt())
            tol = 10 * math.sqrt(torch.finfo(z.dtype).eps) * scale
        key = ("lipschitz", z.device, z.dtype)
        if key not in self._cache:
            self._cache[key] = torch.linalg.matrix_norm(y, ord=2).square()
        step = 1 / self._cache[key]
        rows = max(1, min(z.shape[0], self.block_size // self.n_support))
        out = [self._prox_rows(z[r:r + rows], lam[r:r + rows], y, g, step, tol, max_iter)
               for r in range(0, z.shape[0], rows)]
        return torch.cat(out)

    def _prox_rows(self, z, lam, y, g, step, tol, max_iter):
        """FISTA with gradient restarts for one block of rows of ``prox_conjugate``, polished by
        an exact solve on the current support of p; returns when every row is certified."""
        linear = lam[:, None] * g

        def gradient(p):
            return linear + (p @ y - z) @ y.T

        def error_bound(p):
            grad = gradient(p)
            return torch.sqrt(2 * ((grad * p).sum(1) - grad.min(1).values).clamp_min(0))

        start = (linear - z @ y.T + self._param("squared_norms", z) / 2).argmin(1)
        p = torch.nn.functional.one_hot(start, self.n_support).to(z.dtype)
        extrapolated, momentum = p, torch.ones_like(lam)
        result, best = p, error_bound(p)
        for it in range(max_iter):
            grad = gradient(extrapolated)
            p_new = _project_simplex(extrapolated - step * grad)
            restart = ((grad * (p_new - p)).sum(1) > 0)[:, None]
            momentum_new = (1 + torch.sqrt(1 + 4 * momentum.square())) / 2
            beta = torch.where(restart, 0.0, ((momentum - 1) / momentum_new)[:, None])
            momentum = torch.where(restart[:, 0], torch.ones_like(momentum), momentum_new)
            extrapolated = p_new + beta * (p_new - p)
            p = p_new
            if it % 10 == 9:
                for candidate in (p, _solve_on_support(p, y, z, linear)):
                    bound = error_bound(candidate)
                    better = bound < best
                    result = torch.where(better[:, None], candidate, result)
                    best = torch.where(better, bound, best)
                if float(best.max()) <= tol:
                    return result @ y
        warnings.warn(f"prox_conjugate stopped after {max_iter} iterations with error bound "
                      f"{float(best.max())} > tol {tol}", RuntimeWarning, stacklevel=3)
        return result @ y
