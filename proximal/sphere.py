"""Brenier potential of the uniform measure on the sphere of radius r, from N(0, I_k).

``phi(x) = r |x|``, ``T(x) = r x / |x|``; ``phi^*`` is the indicator of the closed ball of
radius r, so ``prox_{lam phi^*}`` is the projection onto that ball (for every lam > 0).
With ``s = 1 - t`` the field is ``u_t(x) = x / t`` inside the ball of radius r t and
``u_t(x) = (r - |x|) x / (|x| s)`` outside it (where the OT path runs: ``|x_t| >= r t``).
"""

from __future__ import annotations

import torch

from proximal.potential import BrenierPotential

__all__ = ["SpherePotential"]


class SpherePotential(BrenierPotential):
    """Uniform measure on the sphere {|y| = radius} in R^dim (dim >= 2 for a sphere proper).

    ``T`` is undefined at x = 0 (a null set of the source); there it returns 0, the mean of
    the subgradient set.
    """

    def __init__(self, radius: float = 1.0, *, dim: int = 3) -> None:
        radius = float(radius)
        if not radius > 0 or radius == float("inf"):
            raise ValueError(f"radius must be a finite positive number, got {radius}")
        super().__init__(dim)
        self.radius = radius

    def transport_map(self, x0: torch.Tensor) -> torch.Tensor:
        """``T(x0) = r x0 / |x0|``: (B, dim) -> (B, dim)."""
        self._check_points(x0, "x0")
        norm = x0.norm(dim=1, keepdim=True)
        return self.radius * x0 / torch.where(norm > 0, norm, torch.ones_like(norm))

    def prox_conjugate(self, z: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """Projection of z onto the ball of radius r: ``z min(1, r / |z|)``; (B, dim) -> (B, dim)."""
        self._check_points(z, "z")
        self._check_lam(lam, z)
        norm = z.norm(dim=1, keepdim=True)
        return z * (self.radius / norm.clamp_min(self.radius))

    def _velocity64(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The closed form above in float64 (no cancellation between x1 and x; the normal component
        ``r - |x|`` is as accurate as |x| in float64); 0 at x = 0."""
        x = x.to(torch.float64)
        t = (1 - s)[:, None]
        norm = x.norm(dim=1, keepdim=True)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        outside = x * ((self.radius - norm) / (safe * s[:, None]))
        inside = x / torch.where(t > 0, t, torch.ones_like(t))
        return torch.where(norm >= self.radius * t, outside, inside)
