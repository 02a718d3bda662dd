"""Brenier potential of a Gaussian target N(m, S) from the standard Gaussian source.

``phi(x) = <m, x> + x^T A x / 2`` with ``A = S^{1/2}`` (S may be singular: a Gaussian on an
affine subspace), ``T(x) = m + A x`` and ``prox_{lam phi^*}(z) = m + A (A + lam I)^{-1} (z - m)``,
all applied in the eigenbasis of S.
"""

from __future__ import annotations

import torch

from proximal.potential import BrenierPotential

__all__ = ["GaussianPotential"]


class GaussianPotential(BrenierPotential):
    """Target N(mean, cov); mean (d,), cov (d, d) symmetric positive semi-definite (possibly singular).

    Eigenvalues of cov below ``-sqrt(eps) * max eigenvalue`` raise ValueError; those below
    ``d * eps * max eigenvalue`` (round-off, eps of cov's dtype) are set to 0.
    """

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        mean = torch.as_tensor(mean)
        if not mean.is_floating_point():
            mean = mean.to(torch.get_default_dtype())
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape (d,), got {tuple(mean.shape)}")
        d = mean.shape[0]
        super().__init__(d)
        cov = torch.as_tensor(cov, dtype=mean.dtype, device=mean.device)
        if cov.shape != (d, d):
            raise ValueError(f"cov must have shape ({d}, {d}), got {tuple(cov.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise ValueError("mean and cov must be finite")
        if not torch.allclose(cov, cov.T, rtol=1e-6, atol=1e-12):
            raise ValueError("cov must be symmetric")
        eigenvalues, basis = torch.linalg.eigh(cov.to(torch.float64))
        eps = torch.finfo(cov.dtype).eps
        largest = float(eigenvalues.abs().max())
        if float(eigenvalues.min()) < -(eps ** 0.5) * largest:
            raise ValueError(f"cov must be positive semi-definite, smallest eigenvalue {float(eigenvalues.min())}")
        # round-off eigenvalues of a singular cov would become sqrt(eps)-sized directions: zero them
        eigenvalues = torch.where(eigenvalues > d * eps * largest, eigenvalues, torch.zeros_like(eigenvalues))
        self._register("mean", mean)
        self._register("basis", basis)
        self._register("sqrt_eigenvalues", eigenvalues.sqrt())

    @property
    def mean(self) -> torch.Tensor:
        """(d,) mean m."""
        return self._tensors["mean"]

    @property
    def sqrt_cov(self) -> torch.Tensor:
        """(d, d) symmetric square root A = S^{1/2}."""
        basis = self._tensors["basis"]
        return (basis * self._tensors["sqrt_eigenvalues"]) @ basis.T

    def _spectral(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """Apply ``V diag(factor) V^T`` to the rows of x; factor (d,) or (B, d) in the eigenbasis."""
        basis = self._param("basis", x)
        return ((x @ basis) * factor) @ basis.T

    def transport_map(self, x0: torch.Tensor) -> torch.Tensor:
        """``T(x0) = m + A x0``: (B, d) -> (B, d)."""
        self._check_points(x0, "x0")
        return self._param("mean", x0) + self._spectral(x0, self._param("sqrt_eigenvalues", x0))

    def prox_conjugate(self, z: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """``m + A (A + lam I)^{-1} (z - m)``: z (B, d), lam float or (B,) -> (B, d)."""
        self._check_points(z, "z")
        lam = self._check_lam(lam, z)
        a = self._param("sqrt_eigenvalues", z)
        mean = self._param("mean", z)
        return mean + self._spectral(z - mean, a / (a + lam[:, None]))

    def _velocity64(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``u_t(x) = (t A + s I)^{-1} (m + (A - I) x)`` with ``s = 1 - t``, in float64: free of the
        cancellation in (x1 - x) / s; in the null space of A it reads ``(m - x) / s``."""
        x = x.to(torch.float64)
        a = self._param("sqrt_eigenvalues", x)
        mean = self._param("mean", x)
        return self._spectral(mean + self._spectral(x, a - 1), 1 / ((1 - s)[:, None] * a + s[:, None]))
