"""Manifold-supported targets with exact Brenier potentials (DESIGN.md section 1, closed forms).

A target is a product over consecutive coordinate blocks of three kinds of factor:

    SphereBlock(k, r)      uniform on the k-sphere of radius r   (k + 1 coordinates)   T(x) = r x / |x|
    GaussianBlock(m, S)    N(m, S), S may be singular            (len(m) coordinates)  T(x) = m + S^{1/2} x
    PointBlock(c)          the point c                           (len(c) coordinates)  T(x) = c

With the isotropic source N(0, I_D) the OT map to the product is the product of the block maps
(the quadratic cost separates), so ``sample(n) = T(x0)`` with x0 ~ N(0, I_D) and ``potential()``
is the ``proximal.ProductPotential`` of the block potentials. The support M is the product of
the spheres, the affine subspaces ``m + range(S)`` and the points; ``project`` is the nearest
point of M (blockwise), and the tangent and normal projectors at x are those of M at
``project(x)``, as (B, D, D) block-diagonal orthogonal projectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ot_cfm.utils.validation import check_batch
from proximal.gaussian import GaussianPotential
from proximal.point import PointPotential
from proximal.product import ProductPotential
from proximal.sphere import SpherePotential

__all__ = [
    "SphereBlock", "GaussianBlock", "PointBlock", "ProductManifold",
    "Sphere", "Circle", "Cylinder", "CliffordTorus", "Subspace", "MANIFOLD_NAMES", "manifold_by_name",
]


def _vector(value, name: str) -> torch.Tensor:
    """A finite 1-D float64 tensor."""
    value = torch.as_tensor(value, dtype=torch.float64)
    if value.ndim != 1 or value.numel() == 0 or not torch.isfinite(value).all():
        raise ValueError(f"{name} must be a non-empty finite vector, got shape {tuple(value.shape)}")
    return value


class SphereBlock:
    """Uniform measure on the k-sphere of radius r centred at 0 of a block of k + 1 coordinates.

    Nearest point ``r x / |x|`` (``r e_1`` at x = 0); normal space at y: span(y).
    """

    def __init__(self, dim: int, radius: float = 1.0) -> None:
        if int(dim) != dim or dim < 1:
            raise ValueError(f"sphere dimension must be a positive integer, got {dim!r}")
        if not (radius > 0 and float(radius) < float("inf")):
            raise ValueError(f"radius must be positive and finite, got {radius!r}")
        self.dim, self.radius, self.size = int(dim), float(radius), int(dim) + 1

    def transport_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k+1) -> (B, k+1): ``r x / |x|``."""
        return self.project(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k+1) -> (B, k+1): ``r x / |x|``, and ``r e_1`` where x = 0."""
        norm = x.norm(dim=1, keepdim=True)
        pole = torch.zeros_like(x)
        pole[:, 0] = 1
        return self.radius * torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), pole)

    def tangent_projector(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k+1) -> (B, k+1, k+1): ``I - n n^T`` with ``n = project(x) / r``."""
        n = self.project(x) / self.radius
        return torch.eye(self.size, dtype=x.dtype, device=x.device) - n[:, :, None] * n[:, None, :]

    def potential(self, dtype: torch.dtype, device: torch.device | str | None):
        """``proximal.SpherePotential``: ``phi(x) = r |x|``."""
        return SpherePotential(radius=self.radius, dim=self.size)

    def __repr__(self) -> str:
        return f"SphereBlock(dim={self.dim}, radius={self.radius})"


class GaussianBlock:
    """N(m, S) on a block of len(m) coordinates; S symmetric positive semi-definite, possibly singular.

    Support ``m + range(S)``, of dimension rank(S) (eigenvalues above ``rank_tol * max eigenvalue``);
    nearest point ``m + P (x - m)`` with P the orthogonal projector onto range(S).
    """

    def __init__(self, mean, cov, *, rank_tol: float = 1e-10) -> None:
        mean = _vector(mean, "mean")
        cov = torch.as_tensor(cov, dtype=torch.float64)
        size = mean.shape[0]
        if cov.shape != (size, size) or not torch.isfinite(cov).all():
            raise ValueError(f"cov must be a finite ({size}, {size}) matrix, got shape {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.T, atol=1e-12 * (1 + float(cov.abs().max()))):
            raise ValueError("cov must be symmetric")
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        top = float(eigenvalues.max())
        if top <= 0 or float(eigenvalues.min()) < -1e-9 * top:
            raise ValueError(f"cov must be positive semi-definite and non-zero, got eigenvalues {eigenvalues.tolist()}")
        basis = eigenvectors[:, eigenvalues > rank_tol * top]
        self.mean, self.cov, self.size, self.dim = mean, cov, size, basis.shape[1]
        self._projector = basis @ basis.T
        self._sqrt = (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T

    def transport_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, m) -> (B, m): ``m + S^{1/2} x``."""
        return self.mean.to(x) + x @ self._sqrt.to(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, m) -> (B, m): ``m + P (x - m)``."""
        mean = self.mean.to(x)
        return mean + (x - mean) @ self._projector.to(x)

    def tangent_projector(self, x: torch.Tensor) -> torch.Tensor:
        """(B, m) -> (B, m, m): the constant projector onto range(S)."""
        return self._projector.to(x).expand(x.shape[0], self.size, self.size)

    def potential(self, dtype: torch.dtype, device: torch.device | str | None):
        """``proximal.GaussianPotential(m, S)``: ``phi(x) = <m, x> + x^T S^{1/2} x / 2``."""
        return GaussianPotential(self.mean.to(dtype=dtype, device=device), self.cov.to(dtype=dtype, device=device))

    def __repr__(self) -> str:
        return f"GaussianBlock(size={self.size}, rank={self.dim})"


class PointBlock:
    """The Dirac mass at c on a block of len(c) coordinates: dimension 0, nearest point c."""

    def __init__(self, point) -> None:
        self.point = _vector(point, "point")
        self.size, self.dim = self.point.shape[0], 0

    def transport_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, m) -> (B, m): c."""
        return self.point.to(x).expand_as(x).clone()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, m) -> (B, m): c."""
        return self.transport_map(x)

    def tangent_projector(self, x: torch.Tensor) -> torch.Tensor:
        """(B, m) -> (B, m, m): zero."""
        return x.new_zeros(x.shape[0], self.size, self.size)

    def potential(self, dtype: torch.dtype, device: torch.device | str | None):
        """``proximal.PointPotential(c)``: ``phi(x) = <c, x>``."""
        return PointPotential(self.point.to(dtype=dtype, device=device))

    def __repr__(self) -> str:
        return f"PointBlock(size={self.size})"


class ProductManifold:
    """Product of blocks laid out on consecutive coordinates, the support of an exact OT target.

    Args:
        blocks: sequence of ``SphereBlock``, ``GaussianBlock`` and ``PointBlock``; block i occupies
            the coordinates after those of blocks 0..i-1.

    Attributes: ``ambient_dim`` D (sum of block sizes), ``dim`` (sum of block dimensions),
    ``codim = D - dim``, ``slices`` (one per block).
    """

    def __init__(self, blocks: Sequence) -> None:
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, (SphereBlock, GaussianBlock, PointBlock)) for b in blocks):
            raise ValueError(f"blocks must be a non-empty sequence of SphereBlock, GaussianBlock, PointBlock; "
                             f"got {blocks!r}")
        self.blocks = tuple(blocks)
        self.slices, start = [], 0
        for block in self.blocks:
            self.slices.append(slice(start, start + block.size))
            start += block.size
        self.slices = tuple(self.slices)
        self.ambient_dim = start
        self.dim = sum(b.dim for b in self.blocks)
        self.codim = self.ambient_dim - self.dim

    @property
    def name(self) -> str:
        """Short description used in reports."""
        return type(self).__name__

    def _check(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        check_batch(x, name)
        if x.ndim != 2 or x.shape[1] != self.ambient_dim:
            raise ValueError(f"{name} must have shape (B, {self.ambient_dim}) for {self!r} "
                             f"(ambient dimension {self.ambient_dim}), got {tuple(x.shape)}")
        return x

    def _blockwise(self, method: str, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(b, method)(x[:, s]) for b, s in zip(self.blocks, self.slices)], dim=1)

    def transport_map(self, x0: torch.Tensor) -> torch.Tensor:
        """Brenier map of N(0, I_D) onto the target, blockwise: (B, D) -> (B, D)."""
        return self._blockwise("transport_map", self._check(x0, "x0"))

    def sample(self, n: int, generator: torch.Generator | None = None, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """n i.i.d. target samples ``T(x0)``, x0 ~ N(0, I_D): (n, D) on the generator's device by default."""
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if device is None and generator is not None:
            device = generator.device
        x0 = torch.randn(int(n), self.ambient_dim, generator=generator, dtype=dtype, device=device)
        return self.transport_map(x0)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest point of M, blockwise: (B, D) -> (B, D)."""
        return self._blockwise("project", self._check(x))

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Euclidean distance to M: (B, D) -> (B,)."""
        return (x - self.project(x)).norm(dim=1)

    def tangent_projector(self, x: torch.Tensor) -> torch.Tensor:
        """Orthogonal projector onto the tangent space of M at ``project(x)``: (B, D) -> (B, D, D), rank dim."""
        self._check(x)
        out = x.new_zeros(x.shape[0], self.ambient_dim, self.ambient_dim)
        for block, s in zip(self.blocks, self.slices):
            out[:, s, s] = block.tangent_projector(x[:, s])
        return out

    def normal_projector(self, x: torch.Tensor) -> torch.Tensor:
        """``I - tangent_projector(x)``: (B, D) -> (B, D, D), rank codim."""
        return torch.eye(self.ambient_dim, dtype=x.dtype, device=x.device) - self.tangent_projector(x)

    def potential(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None):
        """The exact Brenier potential ``proximal.ProductPotential`` of the block potentials."""
        return ProductPotential([(s, b.potential(dtype, device)) for b, s in zip(self.blocks, self.slices)])

    def __repr__(self) -> str:
        return f"{self.name}(ambient_dim={self.ambient_dim}, dim={self.dim}, blocks={list(self.blocks)})"


class Sphere(ProductManifold):
    """The k-sphere of radius r on coordinates ``offset .. offset + k`` of R^D, the others fixed at 0.

    Uniform sphere x point; ``ambient_dim`` defaults to k + 1.
    """

    def __init__(self, dim: int, radius: float = 1.0, ambient_dim: int | None = None, offset: int = 0) -> None:
        sphere = SphereBlock(dim, radius)
        ambient_dim = sphere.size if ambient_dim is None else ambient_dim
        if int(offset) != offset or offset < 0 or int(ambient_dim) != ambient_dim \
                or offset + sphere.size > ambient_dim:
            raise ValueError(f"a {dim}-sphere needs {sphere.size} coordinates from offset {offset}; "
                             f"got ambient_dim={ambient_dim!r}, offset={offset!r}")
        blocks = [PointBlock(torch.zeros(offset))] if offset else []
        blocks.append(sphere)
        rest = int(ambient_dim) - offset - sphere.size
        if rest:
            blocks.append(PointBlock(torch.zeros(rest)))
        super().__init__(blocks)


class Circle(Sphere):
    """The circle of radius r in the first two coordinates of R^D (default D = 3): S^1 x point."""

    def __init__(self, radius: float = 1.0, ambient_dim: int = 3, offset: int = 0) -> None:
        super().__init__(1, radius, ambient_dim, offset)


class Cylinder(ProductManifold):
    """S^k(r) x R^m: the k-sphere of radius r times the Gaussian N(0, scale^2 I_m) on m more coordinates."""

    def __init__(self, sphere_dim: int = 1, line_dim: int = 1, radius: float = 1.0, scale: float = 1.0) -> None:
        if int(line_dim) != line_dim or line_dim < 1 or not scale > 0:
            raise ValueError(f"line_dim must be a positive integer and scale positive, got {line_dim!r}, {scale!r}")
        line = GaussianBlock(torch.zeros(int(line_dim)), scale ** 2 * torch.eye(int(line_dim)))
        super().__init__([SphereBlock(sphere_dim, radius), line])


class CliffordTorus(ProductManifold):
    """S^1(r1) x S^1(r2) in R^4 (coordinates 0-1 and 2-3); equal radii 1/sqrt(2) put it on S^3."""

    def __init__(self, radii: tuple[float, float] = (1.0, 1.0)) -> None:
        if len(radii) != 2:
            raise ValueError(f"radii must be two numbers, got {radii!r}")
        super().__init__([SphereBlock(1, radii[0]), SphereBlock(1, radii[1])])


class Subspace(ProductManifold):
    """N(mean, cov) with singular cov: a Gaussian on the affine subspace ``mean + range(cov)``.

    ``Subspace.spanned_by(basis, scales)`` builds ``cov = B^T diag(scales^2) B`` from k orthonormalised
    rows B (k, D).
    """

    def __init__(self, cov, mean=None) -> None:
        cov = torch.as_tensor(cov, dtype=torch.float64)
        if cov.ndim != 2:
            raise ValueError(f"cov must be a (D, D) matrix, got shape {tuple(cov.shape)}")
        super().__init__([GaussianBlock(torch.zeros(cov.shape[0]) if mean is None else mean, cov)])

    @classmethod
    def spanned_by(cls, basis, scales=1.0, mean=None) -> Subspace:
        """Subspace spanned by the rows of ``basis`` (k, D), with standard deviations ``scales`` along them."""
        basis = torch.as_tensor(basis, dtype=torch.float64)
        if basis.ndim != 2 or basis.shape[0] > basis.shape[1]:
            raise ValueError(f"basis must have shape (k, D) with k <= D, got {tuple(basis.shape)}")
        q = torch.linalg.qr(basis.T).Q.T
        scales = torch.as_tensor(scales, dtype=torch.float64).expand(basis.shape[0])
        return cls(q.T @ (scales.square()[:, None] * q), mean)


#: names accepted by ``manifold_by_name`` (and the command line)
MANIFOLD_NAMES = ("sphere", "circle", "cylinder", "torus", "subspace")


def manifold_by_name(name: str) -> ProductManifold:
    """The default instance of a named manifold: S^2 in R^3, the unit circle in R^3, S^1 x R in R^3,
    the Clifford torus S^1 x S^1 in R^4, or the plane spanned by (1, 1, 0) and (0, 0, 1) in R^3."""
    builders = {
        "sphere": lambda: Sphere(2),
        "circle": lambda: Circle(),
        "cylinder": lambda: Cylinder(),
        "torus": lambda: CliffordTorus(),
        "subspace": lambda: Subspace.spanned_by([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
    }
    if name not in builders:
        raise ValueError(f"unknown manifold {name!r}; expected one of {MANIFOLD_NAMES}")
    return builders[name]()
