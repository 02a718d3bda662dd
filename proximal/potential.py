"""The (extended) Brenier potential and the exact OT-CFM field it defines.

A convex ``phi`` on R^d whose gradient ``T = grad phi`` pushes the source onto the target.
For 0 < t < 1 and ``lam = (1 - t) / t`` the point of the target reached through ``x``
at time t is (proximal form of the OT-CFM field, DESIGN.md section 1)

    x1(x, t) = prox_{lam phi^*}(x / t),    x1(x, 0) = grad phi(x),
    u_t(x)   = (x1(x, t) - x) / (1 - t).

Subclasses implement ``transport_map`` and ``prox_conjugate``; everything else follows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ot_cfm.validation import check_batch, check_time

__all__ = ["BrenierPotential"]


class BrenierPotential(ABC):
    """Base class: a convex potential on R^dim, evaluated batchwise on (B, dim) tensors.

    Parameters are stored once as tensors and cast lazily (and cached) to the device
    and dtype of each input, so one potential serves CPU and GPU, float32 and float64.
    """

    def __init__(self, dim: int) -> None:
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self._tensors: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple, torch.Tensor] = {}

    # -- parameters ---------------------------------------------------------------------

    def _register(self, name: str, value: torch.Tensor) -> None:
        """Store a parameter tensor (detached); casts of it are made on demand."""
        self._tensors[name] = value.detach()
        self._cache = {k: v for k, v in self._cache.items() if k[0] != name}

    def _param(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The parameter ``name`` on ``like``'s device and dtype (cached)."""
        key = (name, like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self._tensors[name].to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    # -- checks -------------------------------------------------------------------------

    def _check_points(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """Check a (B, dim) batch of finite floating points."""
        check_batch(x, name)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (B, {self.dim}), got {tuple(x.shape)}")
        return x

    def _check_lam(self, lam: float | torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Prox parameters as a (B,) tensor of finite positive values on z's device and dtype."""
        lam = torch.as_tensor(lam, dtype=z.dtype, device=z.device)
        if lam.ndim == 0:
            lam = lam.expand(z.shape[0])
        if lam.shape != (z.shape[0],):
            raise ValueError(f"lam must be a float or a tensor of shape ({z.shape[0]},), got {tuple(lam.shape)}")
        if not (torch.isfinite(lam).all() and (lam > 0).all()):
            raise ValueError(f"lam must be finite and positive, got values {lam[:5].tolist()}")
        return lam

    # -- the two primitives -------------------------------------------------------------

    @abstractmethod
    def transport_map(self, x0: torch.Tensor) -> torch.Tensor:
        """Brenier map ``T(x0) = grad phi(x0)``: (B, dim) -> (B, dim)."""

    @abstractmethod
    def prox_conjugate(self, z: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """``prox_{lam phi^*}(z) = argmin_y lam phi^*(y) + |y - z|^2 / 2``: (B, dim) -> (B, dim).

        ``lam`` is a positive float or a (B,) tensor (one parameter per row).
        """

    # -- derived quantities -------------------------------------------------------------

    def recover_target(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Target point ``x1(x, t)``: ``prox_{lam phi^*}(x / t)`` with ``lam = (1-t)/t``, ``T(x)`` at t = 0.

        x: (B, dim); t: float or (B,) in [0, 1) (rows may mix t = 0 and t > 0). Returns (B, dim).
        """
        self._check_points(x)
        t = check_time(t, x, include_high=False)
        positive = t > 0
        if bool(positive.all()):
            return self.prox_conjugate(x / t[:, None], (1 - t) / t)
        if not bool(positive.any()):
            return self.transport_map(x)
        out = torch.empty_like(x)
        tp = t[positive]
        out[positive] = self.prox_conjugate(x[positive] / tp[:, None], (1 - tp) / tp)
        out[~positive] = self.transport_map(x[~positive])
        return out

    def velocity(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Exact OT-CFM field ``u_t(x) = (x1(x, t) - x) / (1 - t)``; x: (B, dim), t in [0, 1)."""
        self._check_points(x)
        t = check_time(t, x, include_high=False)
        return (self.recover_target(x, t) - x) / (1 - t)[:, None]
