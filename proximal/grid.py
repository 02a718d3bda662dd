"""Brenier potential of a tensor grid: a product of 1D discrete measures, from N(0, I_d).

In 1D with sorted points ``y_0 < ... < y_{n-1}`` and weights ``w``, the Laguerre cells are the
intervals between the edges ``e_i = Phi^{-1}(w_0 + ... + w_i)`` (Phi the standard normal CDF),
``T`` is the Gaussian quantile map, ``phi(x) = max_i x y_i - g_i`` with ``g_0 = 0`` and
``g_{i+1} = g_i + e_i (y_{i+1} - y_i)`` (continuity at the edges), and ``phi^*`` is piecewise
linear on [y_0, y_{n-1}] with slope ``e_i`` on [y_i, y_{i+1}], so that

    prox_{lam phi^*}(z) = y_0 + sum_i clamp(z - lam e_i - y_i, 0, y_{i+1} - y_i).

The d-dimensional potential is the sum of the 1D ones (the cost separates). With ``s = 1 - t``,
``z = x / t`` and ``lam = s / t`` the prox is the knot ``y_k`` (exactly) when
``lam e_{k-1} <= z - y_k <= lam e_k``, else ``z - lam e_i`` inside interval i; so the field is
``(y_k - x) / s`` at a knot (on the OT path) and ``(x - e_i) / t`` between knots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proximal.discrete import DiscreteBrenierPotential
from proximal.potential import BrenierPotential

__all__ = ["GridPotential"]


class GridPotential(BrenierPotential):
    """Product of 1D discrete targets; ``points_1d[k]`` (n_k,) distinct, ``weights_1d[k]`` (n_k,) or None (uniform).

    Cumulative weights are clamped to [eps, 1 - eps] (float64 eps) before the Gaussian quantile,
    so a cell of mass below eps at either end is widened to mass eps.
    """

    def __init__(self, points_1d: Sequence[torch.Tensor],
                 weights_1d: Sequence[torch.Tensor | None] | None = None) -> None:
        points_1d = list(points_1d)
        weights_1d = [None] * len(points_1d) if weights_1d is None else list(weights_1d)
        if not points_1d or len(weights_1d) != len(points_1d):
            raise ValueError(f"need one weight vector (or None) per coordinate: got {len(points_1d)} point "
                             f"vectors and {len(weights_1d)} weight vectors")
        super().__init__(len(points_1d))
        for k, (points, weights) in enumerate(zip(points_1d, weights_1d)):
            points, edges, duals, weights = self._one_dimension(k, points, weights)
            self._register(f"points{k}", points)
            self._register(f"edges{k}", edges)
            self._register(f"duals{k}", duals)
            self._register(f"weights{k}", weights)

    @staticmethod
    def _one_dimension(k, points, weights):
        """Sorted points (n,), interior edges (n-1,), dual weights (n,), sorted weights (n,), in float64."""
        points = torch.as_tensor(points, dtype=torch.float64)
        if points.ndim != 1 or points.shape[0] == 0 or not torch.isfinite(points).all():
            raise ValueError(f"points_1d[{k}] must be a non-empty finite 1D tensor, got shape {tuple(points.shape)}")
        n = points.shape[0]
        weights = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None \
            else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (n,) or not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(f"weights_1d[{k}] must be {n} finite non-negative numbers, got shape "
                             f"{tuple(weights.shape)}")
        if abs(float(weights.sum()) - 1) > 1e-5:
            raise ValueError(f"weights_1d[{k}] must sum to 1 (tolerance 1e-5), got {float(weights.sum())}")
        points, order = points.sort()
        if (points[1:] == points[:-1]).any():
            raise ValueError(f"points_1d[{k}] contains duplicate values")
        weights = weights[order]
        eps = torch.finfo(torch.float64).eps
        edges = torch.special.ndtri(weights.cumsum(0)[:-1].clamp(eps, 1 - eps))
        duals = torch.cat([torch.zeros(1, dtype=torch.float64), (edges * points.diff()).cumsum(0)])
        return points, edges, duals, weights

    def _coordinate(self, k: int, like: torch.Tensor):
        """Points, edges and duals of coordinate k on like's device and dtype."""
        return (self._param(f"points{k}", like), self._param(f"edges{k}", like), self._param(f"duals{k}", like))

    def transport_map(self, x0: torch.Tensor) -> torch.Tensor:
        """Coordinatewise Gaussian quantile map ``y_{k, i}`` for ``x0_k`` in cell i: (B, d) -> (B, d)."""
        self._check_points(x0, "x0")
        columns = []
        for k in range(self.dim):
            points, edges, _ = self._coordinate(k, x0)
            columns.append(points[torch.searchsorted(edges, x0[:, k].contiguous())])
        return torch.stack(columns, 1)

    def prox_conjugate(self, z: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """Coordinatewise ``y_0 + sum_i clamp(z - lam e_i - y_i, 0, y_{i+1} - y_i)``: (B, d) -> (B, d)."""
        self._check_points(z, "z")
        lam = self._check_lam(lam, z)[:, None]
        columns = []
        for k in range(self.dim):
            points, edges, _ = self._coordinate(k, z)
            ramps = (z[:, k, None] - lam * edges - points[:-1]).clamp_min(0)
            columns.append(points[0] + torch.minimum(ramps, points.diff()).sum(1))
        return torch.stack(columns, 1)

    def _velocity64(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The field coordinatewise in float64: knots are exact, so no cancellation grows with 1/s."""
        x = x.to(torch.float64)
        t = 1 - s
        start = t == 0
        safe_t = torch.where(start, torch.ones_like(t), t)
        columns = []
        for k in range(self.dim):
            points, edges, _ = self._coordinate(k, x)
            xk = x[:, k]
            if points.shape[0] == 1:  # a point mass in this coordinate
                columns.append((points[0] - xk) / s)
                continue
            # v_i = z - lam e_i falls (weakly) with i, y_{i+1} rises: the saturated intervals form a prefix
            v = (xk[:, None] - s[:, None] * edges) / safe_t[:, None]
            knot = (v >= points[1:]).sum(1)
            interval = knot.clamp_max(points.shape[0] - 2)
            between = (knot < points.shape[0] - 1) & (v.gather(1, interval[:, None])[:, 0] > points[knot])
            u = torch.where(between, (xk - edges[interval]) / safe_t, (points[knot] - xk) / s)
            at_start = points[torch.searchsorted(edges, xk.contiguous())] - xk  # t = 0: T(x) - x
            columns.append(torch.where(start, at_start, u))
        return torch.stack(columns, 1)

    def as_discrete(self, *, block_size: int = 2 ** 24) -> DiscreteBrenierPotential:
        """The same potential as a ``DiscreteBrenierPotential`` over all prod(n_k) grid points
        (row-major order, last coordinate fastest): weights are products, duals sums of the 1D ones."""
        points = [self._tensors[f"points{k}"] for k in range(self.dim)]
        grids = torch.meshgrid(*points, indexing="ij")
        support = torch.stack([grid.reshape(-1) for grid in grids], 1)
        weights = torch.ones(1, dtype=torch.float64)
        duals = torch.zeros(1, dtype=torch.float64)
        for k in range(self.dim):
            weights = (weights[:, None] * self._tensors[f"weights{k}"]).reshape(-1)
            duals = (duals[:, None] + self._tensors[f"duals{k}"]).reshape(-1)
        return DiscreteBrenierPotential(support, weights / weights.sum(), duals, block_size=block_size)
