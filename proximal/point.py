"""Brenier potential of a point mass at c: ``phi(x) = <c, x>``, ``T(x) = c``, ``prox_{lam phi^*}(z) = c``."""

from __future__ import annotations

import torch

from proximal.potential import BrenierPotential

__all__ = ["PointPotential"]


class PointPotential(BrenierPotential):
    """Target delta_c for a point c of shape (d,): every source point is sent to c."""

    def __init__(self, point: torch.Tensor) -> None:
        point = torch.as_tensor(point)
        if not point.is_floating_point():
            point = point.to(torch.get_default_dtype())
        if point.ndim != 1 or point.shape[0] == 0:
            raise ValueError(f"point must have shape (d,), got {tuple(point.shape)}")
        if not torch.isfinite(point).all():
            raise ValueError("point must be finite")
        super().__init__(point.shape[0])
        self._register("point", point)

    @property
    def point(self) -> torch.Tensor:
        """(d,) the point c."""
        return self._tensors["point"]

    def transport_map(self, x0: torch.Tensor) -> torch.Tensor:
        """``T(x0) = c``: (B, d) -> (B, d)."""
        self._check_points(x0, "x0")
        return self._param("point", x0).expand_as(x0).clone()

    def prox_conjugate(self, z: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """``prox_{lam phi^*}(z) = c`` (phi^* is the indicator of {c}): (B, d) -> (B, d)."""
        self._check_points(z, "z")
        self._check_lam(lam, z)
        return self._param("point", z).expand_as(z).clone()

    def _velocity64(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``u_t(x) = (c - x) / s`` in float64, c exact."""
        x = x.to(torch.float64)
        return (self._param("point", x) - x) / s[:, None]
