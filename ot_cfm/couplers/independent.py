"""The independent coupling: the product plan P = a b^T, i.e. I-CFM's pairing."""

from __future__ import annotations

import torch

from ot_cfm.couplers.base import Coupler

__all__ = ["IndependentCoupler"]


class IndependentCoupler(Coupler):
    """Keep the batches' own pairing: x0 and x1 are already independent draws.

    ``indices`` for B0 == B1: (arange(B), arange(B)), no randomness. For B0 != B1: every source once,
    its target drawn uniformly from the B1 targets with ``generator``. ``plan``: the uniform
    product, P_ij = 1 / (B0 B1).
    """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def indices(self, x0: torch.Tensor, x1: torch.Tensor, *,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(i, j) of shape (B0,): i = arange(B0); j = i for equal sizes, else j_i uniform on {0..B1-1}."""
        self.validate(x0, x1)
        i = torch.arange(x0.shape[0], device=x0.device)
        if x0.shape[0] == x1.shape[0]:
            return i, i.clone()
        device = generator.device if generator is not None else x0.device
        j = torch.randint(x1.shape[0], (x0.shape[0],), generator=generator, device=device)
        return i, j.to(x0.device)

    def plan(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """The product plan of shape (B0, B1), every entry 1 / (B0 B1), in x0's dtype and on its device."""
        self.validate(x0, x1)
        n0, n1 = x0.shape[0], x1.shape[0]
        return torch.full((n0, n1), 1.0 / (n0 * n1), dtype=x0.dtype, device=x0.device)
