"""Population coupling from a Brenier potential: each source sample x0 is paired with T(x0).

For an empirical target (``DiscreteBrenierPotential``) T(x0) is the support point of the
Laguerre cell containing x0, found by one blocked max-inner-product search; the coupling is
then the semi-discrete OT plan itself, not a minibatch estimate of it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ot_cfm.couplers.base import Coupler
from ot_cfm.utils.validation import check_batch

__all__ = ["SemidiscreteCoupler", "TransportMap", "DiscreteTransportMap"]


@runtime_checkable
class TransportMap(Protocol):
    """What the coupler needs of a potential: its flattened dimension and x0 (B, dim) -> T(x0) (B, dim).

    Every ``proximal.BrenierPotential`` is one; ``ot_cfm`` does not import ``proximal`` (it sits below it).
    """

    dim: int

    def transport_map(self, x0: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class DiscreteTransportMap(TransportMap, Protocol):
    """A transport map onto N support points (``proximal.DiscreteBrenierPotential``): ``support`` (N, dim),
    ``n_support`` = N, and ``assign(x, t)`` (B, dim) -> (B,) support indices (t = 0: the Laguerre cell of x)."""

    n_support: int

    @property
    def support(self) -> torch.Tensor: ...

    def assign(self, x: torch.Tensor, t: float | torch.Tensor = 0.0) -> torch.Tensor: ...


class SemidiscreteCoupler(Coupler):
    """Pair x0 (B0, *shape) with ``T(x0)``, prod(shape) = potential.dim.

    The data batch x1 is not used for the pairing (only its per-sample shape, device and dtype
    are checked): the target points come from the potential. ``support_labels`` (N,), one
    label per support point of a discrete potential, are the labels returned for the targets.
    ``indices`` and ``plan`` need a ``DiscreteBrenierPotential`` (j indexes its support);
    closed-form potentials only support ``pair``.
    """

    requires_equal_sizes = False

    def __init__(self, potential, support_labels: torch.Tensor | None = None) -> None:
        if not isinstance(potential, TransportMap):
            raise ValueError(f"potential must be a Brenier potential (an object with dim and transport_map, such as "
                             f"proximal.DiscreteBrenierPotential), got {type(potential).__name__}")
        if support_labels is not None:
            if not isinstance(potential, DiscreteTransportMap):
                raise ValueError("support_labels need a DiscreteBrenierPotential (one label per support point)")
            if not isinstance(support_labels, torch.Tensor) or support_labels.shape[:1] != (potential.n_support,):
                got = tuple(support_labels.shape) if isinstance(support_labels, torch.Tensor) \
                    else type(support_labels).__name__
                raise ValueError(f"support_labels must be a tensor with {potential.n_support} rows, got {got}")
        self.potential = potential
        self.support_labels = support_labels
        self.discrete = isinstance(potential, DiscreteTransportMap)

    def __repr__(self) -> str:
        size = f", n_support={self.potential.n_support}" if self.discrete else ""
        return (f"{type(self).__name__}(potential={type(self.potential).__name__}(dim={self.potential.dim}{size}), "
                f"labelled={self.support_labels is not None})")

    def validate(self, x0: torch.Tensor, x1: torch.Tensor | None) -> None:
        """x0 is a finite (B0, *shape) batch with prod(shape) = dim; x1, if given, matches its shape/dtype/device."""
        if x1 is None:
            check_batch(x0, "x0")
        else:
            super().validate(x0, x1)
        features = x0[0].numel()
        if features != self.potential.dim:
            raise ValueError(f"x0 has {features} features per sample, the potential has dim {self.potential.dim}")

    def _discrete(self):
        """The potential, checked to be a ``DiscreteBrenierPotential``."""
        if not self.discrete:
            raise ValueError(f"{type(self.potential).__name__} has no support to index: indices and plan need a "
                             "DiscreteBrenierPotential; use pair for closed-form potentials")
        return self.potential

    def indices(self, x0: torch.Tensor, x1: torch.Tensor | None, *,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(arange(B0), j)`` with ``j[k]`` the support index of the Laguerre cell of x0[k]; (B0,) each.

        ``j`` indexes the potential's support, not x1. ``generator`` is unused (the coupling is deterministic).
        """
        potential = self._discrete()
        self.validate(x0, x1)
        j = potential.assign(x0.reshape(x0.shape[0], -1), 0.0)
        return torch.arange(x0.shape[0], device=x0.device), j

    def plan(self, x0: torch.Tensor, x1: torch.Tensor | None) -> torch.Tensor:
        """The (B0, N) assignment matrix divided by B0: row k has mass 1/B0 at its cell's support index."""
        potential = self._discrete()
        _, j = self.indices(x0, x1)
        plan = torch.zeros(x0.shape[0], potential.n_support, dtype=x0.dtype, device=x0.device)
        plan[torch.arange(x0.shape[0], device=x0.device), j] = 1.0 / x0.shape[0]
        return plan

    def pair(self, x0: torch.Tensor, x1: torch.Tensor | None, y0: torch.Tensor | None = None,
             y1: torch.Tensor | None = None, *, generator: torch.Generator | None = None):
        """``(x0, T(x0))``, or ``(x0, T(x0), y0, labels)`` when labels are asked for.

        T(x0) has x0's shape, device and dtype. The target labels come from ``support_labels``
        (the given y1 belong to x1, which is replaced, so they are only used to ask for labels);
        asking for them without ``support_labels`` raises ValueError.
        """
        self.validate(x0, x1)
        flat = x0.reshape(x0.shape[0], -1)
        if self.discrete:
            j = self.potential.assign(flat, 0.0)
            support = self.potential.support
            target = support[j.to(support.device)].to(device=x0.device, dtype=x0.dtype).reshape(x0.shape)
        else:
            j = None
            target = self.potential.transport_map(flat).reshape(x0.shape)
        if y0 is None and y1 is None:
            return x0, target
        if y0 is not None and (not isinstance(y0, torch.Tensor) or y0.shape[0] != x0.shape[0]):
            got = tuple(y0.shape) if isinstance(y0, torch.Tensor) else type(y0).__name__
            raise ValueError(f"y0 must be a tensor with one label per sample ({x0.shape[0]}), got {got}")
        if y1 is not None and self.support_labels is None:
            raise ValueError("target labels need support_labels: x1 is replaced by support points, so y1 cannot follow")
        labels = self.support_labels[j.to(self.support_labels.device)] if self.support_labels is not None else None
        return x0, target, y0, labels
