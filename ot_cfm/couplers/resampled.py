"""Pairs drawn with replacement from another coupler's pairs: torchcfm's way of sampling an OT plan.

torchcfm's ``OTPlanSampler`` draws the B training pairs of a step i.i.d. from the minibatch plan, so
about 1/e = 36.8 % of a batch are repeats and as many points are left out. ``ResampledCoupler(base)``
does the same on top of any coupler that pairs x0 with x1: it draws k_1, ..., k_K uniformly with
replacement from the K pairs (i, j) of ``base.indices`` and returns (i[k], j[k]). Each drawn pair has
the base pairs' law. For a permutation (exact OT at equal sizes) the draws are exactly torchcfm's:
i.i.d. from the plan. For a base that itself samples its pairs (Sinkhorn, unbalanced or partial plans)
they resample that sample, so two draws of one row share its target, where torchcfm's are independent.

The expected loss does not change, only its variance: a step trains on about 0.63 K distinct pairs.
On scikit-learn's digits that acts like a smaller batch, for I-CFM as for OT-CFM: lower Fréchet
distance at one Euler step, higher pixel W2, and an I-CFM field further from its exact value
(``examples/results/digits.md``, "Pair sampling"). The package's default is the base coupler's pairs,
each once.
"""

from __future__ import annotations

import torch

from ot_cfm.couplers.base import Coupler
from ot_cfm.couplers.semidiscrete import SemidiscreteCoupler

__all__ = ["ResampledCoupler"]


class ResampledCoupler(Coupler):
    """K pairs drawn uniformly with replacement from the K pairs of ``base`` (any Coupler).

    ``indices(x0, x1, generator=, y1=)``: (i[k], j[k]) with (i, j) = ``base.indices`` and k (K,) drawn
    with ``generator`` after the base coupler's draws; ``y1`` reaches a base that takes labels
    (``ClassConditionalCoupler``) and is otherwise unused (labels follow their points in ``pair``).
    ``plan``: the base coupler's plan, which each pair is drawn from.
    """

    def __init__(self, base: Coupler) -> None:
        if not isinstance(base, Coupler):
            raise ValueError(f"base must be a Coupler instance (e.g. ExactOTCoupler()), got {base!r}")
        if isinstance(base, SemidiscreteCoupler):
            raise ValueError("SemidiscreteCoupler pairs x0 with its potential's support, not with x1: its pairs are "
                             "not a plan between the batches to resample; use it directly")
        self.base = base
        self.requires_equal_sizes = base.requires_equal_sizes
        self.takes_labels = base.takes_labels

    @property
    def solves_on_cpu(self) -> bool:
        """As its base coupler: resampling is one draw of K integers."""
        return self.base.solves_on_cpu

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base!r})"

    def validate(self, x0: torch.Tensor, x1: torch.Tensor) -> None:
        self.base.validate(x0, x1)

    def indices(self, x0: torch.Tensor, x1: torch.Tensor, *, generator: torch.Generator | None = None,
                y1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(i[k], j[k]), each of shape (K,), on x0's device; k uniform on {0..K-1}, with replacement."""
        labels = {"y1": y1} if self.takes_labels else {}
        i, j = self.base.indices(x0, x1, generator=generator, **labels)
        device = generator.device if generator is not None else i.device
        k = torch.randint(i.shape[0], (i.shape[0],), generator=generator, device=device).to(i.device)
        return i[k], j[k]

    def plan(self, x0: torch.Tensor, x1: torch.Tensor, *, y1: torch.Tensor | None = None) -> torch.Tensor:
        """The base coupler's plan (B0, B1): the law of each drawn pair."""
        return self.base.plan(x0, x1, **({"y1": y1} if self.takes_labels else {}))
