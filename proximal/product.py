"""Brenier potential of a product target over coordinate blocks.

With an isotropic Gaussian source the squared cost separates, so the OT map to a product of
block targets is the product of the blocks' maps: ``phi(x) = sum_b phi_b(x[S_b])``, and the map,
the prox of ``lam phi^*`` and the field are all applied block by block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proximal.potential import BrenierPotential

__all__ = ["ProductPotential"]


class ProductPotential(BrenierPotential):
    """``blocks``: a sequence of ``(slice, potential)``; the slices (integer start and stop, step 1
    or a positive step) must cover the coordinates 0..d-1 exactly once, each with ``potential.dim`` entries.
    """

    def __init__(self, blocks: Sequence[tuple[slice, BrenierPotential]]) -> None:
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks must be a non-empty sequence of (slice, potential)")
        coordinates = []
        for item in blocks:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], slice)
                    and isinstance(item[1], BrenierPotential)):
                raise ValueError(f"each block must be a (slice, BrenierPotential) pair, got {item!r}")
            block, potential = item
            if block.start is None or block.stop is None or block.start < 0 or (block.step or 1) < 1:
                raise ValueError(f"block slices need explicit non-negative start and stop, got {block}")
            covered = list(range(block.start, block.stop, block.step or 1))
            if len(covered) != potential.dim:
                raise ValueError(f"slice {block} covers {len(covered)} coordinates but its potential has "
                                 f"dim {potential.dim}")
            coordinates.extend(covered)
        dim = len(coordinates)
        if sorted(coordinates) != list(range(dim)):
            raise ValueError(f"the block slices must cover coordinates 0..{dim - 1} exactly once, "
                             f"got {sorted(coordinates)}")
        super().__init__(dim)
        self.blocks = tuple((block, potential) for block, potential in blocks)

    def _blockwise(self, x: torch.Tensor, apply) -> torch.Tensor:
        """Assemble ``apply(potential, x[:, block])`` over the blocks into a (B, d) tensor."""
        out = torch.empty_like(x)
        for block, potential in self.blocks:
            out[:, block] = apply(potential, x[:, block])
        return out

    def transport_map(self, x0: torch.Tensor) -> torch.Tensor:
        """Blockwise ``T_b(x0[S_b])``: (B, d) -> (B, d)."""
        self._check_points(x0, "x0")
        return self._blockwise(x0, lambda p, xb: p.transport_map(xb))

    def prox_conjugate(self, z: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """Blockwise ``prox_{lam phi_b^*}(z[S_b])`` (phi^* of a separable sum is the sum of the phi_b^*)."""
        self._check_points(z, "z")
        lam = self._check_lam(lam, z)
        return self._blockwise(z, lambda p, zb: p.prox_conjugate(zb, lam))

    def _recover_target(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Blockwise ``x1_b(x[S_b], t)``; x (B, d), float64 times to go s (B,)."""
        return self._blockwise(x, lambda p, xb: p._recover_target(xb, s))

    def _velocity64(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Blockwise ``u_t^b(x[S_b])`` in float64, each block in its own accurate form."""
        return self._blockwise(x.to(torch.float64), lambda p, xb: p._velocity64(xb, s))
