"""Couplers whose plans may drop mass: unbalanced entropic OT and partial OT, solved by POT.

For batches x0 (B0, *shape), x1 (B1, *shape), C_ij = |x0_i - x1_j|^2 (flattened points) and uniform
masses a = 1/B0, b = 1/B1:

Unbalanced (Chizat et al. 2018; ``ot.unbalanced.sinkhorn_unbalanced``, torchcfm's ``"unbalanced"``):

    P = argmin_{P >= 0} <P, C> + eps KL(P | a b^T) + reg_m (KL(P 1 | a) + KL(P^T 1 | b)).

The marginals are penalised, not imposed: a point far from the other batch keeps little mass, since
paying reg_m KL costs less than moving it.

Partial (Caffarelli and McCann 2010; Chapel et al. 2020; ``ot.partial.partial_wasserstein``):

    P = argmin <P, C>   s.t.  P 1 <= a,  P^T 1 <= b,  sum P = m,

so a fraction m of the mass moves and the rest, the costliest to move, stays: points far enough from the
other batch get no mass at all. With ``epsilon`` the entropic version (``ot.partial.entropic_partial_wasserstein``,
torchcfm's ``"partial"``).

Training pairs are drawn from the plan: K = B0 pairs i.i.d. from P / sum P (row i with probability
proportional to its mass, then j ~ P[i, :]), through the caller's generator (``sample_rows``); a source
or target without mass is never drawn, and pairs may repeat.

Invariances and units. Both batches are moved by one common point and divided by one power of two s
(``centre_and_scale``), then C is formed in float64 on the input's device (POT works on torch tensors
there; the exact partial solver copies to the CPU). A common translation leaves C unchanged. Moving each
batch by its own point, which leaves a balanced plan optimal, would change these plans (it adds a term
of i and a term of j to C, no longer constant over plans whose marginals vary), so the centre is common.
The exact partial plan is the same for C and lambda C, so it is invariant to a common scaling of both
batches. The entropic plans depend on C / eps and C / reg_m: ``normalize`` chooses the cost unit in which
``epsilon`` and ``reg_m`` are read:

- ``"mean"`` (default): the mean pairwise cost mean_ij C_ij, as ``SinkhornCoupler``'s relative epsilon;
  the plan is then invariant to a common scaling of both batches. Outliers raise the mean cost, and
  with it the effective eps and reg_m (less than they raise the largest cost);
- ``"max"``: the largest pairwise cost (torchcfm's ``normalize_cost=True``);
- ``None``: absolute, in the units of |x0 - x1|^2 (torchcfm's default): the plan then changes when the
  data is rescaled (reg_m / eps fixes how far mass travels before it is cheaper to drop it).
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from dataclasses import dataclass

import torch

from ot_cfm.couplers.base import Coupler, centre_and_scale, sample_rows
from ot_cfm.couplers.network_simplex import EMD_MAX_ITER

__all__ = ["UnbalancedCoupler", "PartialCoupler", "RelaxedPlan", "sample_pairs", "NORMALIZATIONS", "UNBALANCED_METHODS"]

#: cost units for epsilon and reg_m: the mean pairwise cost, the largest one, or None (absolute)
NORMALIZATIONS = ("mean", "max", None)
#: POT's unbalanced Sinkhorn variants (``ot.unbalanced.sinkhorn_unbalanced(method=...)``)
UNBALANCED_METHODS = ("sinkhorn", "sinkhorn_stabilized", "sinkhorn_translation_invariant")


@dataclass(frozen=True)
class RelaxedPlan:
    """A plan that may drop mass: ``plan`` (B0, B1) float64 on x0's device, as POT returns it for masses
    a = 1/B0, b = 1/B1 (not normalised); ``mass`` = plan.sum() (m for partial plans, free for unbalanced ones);
    ``unit`` the cost unit that epsilon and reg_m were read in, in units of |x0 - x1|^2."""

    plan: torch.Tensor
    mass: float
    unit: float


def sample_pairs(plan: torch.Tensor, num_pairs: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j), each (num_pairs,) on plan's device: pairs drawn i.i.d. (with replacement) from P / sum P for a
    non-negative plan P (B0, B1) of any total mass: i with probability sum_j P_ij / sum P, then j with
    probability P_ij / sum_j P_ij. Two Gumbel-max draws (``sample_rows``) of sizes (num_pairs, B0) and
    (num_pairs, B1), never (num_pairs, B0 B1); entries without mass are never drawn."""
    if plan.ndim != 2 or not torch.isfinite(plan).all() or (plan < 0).any() or not plan.sum() > 0:
        raise ValueError(f"plan must be a finite, non-negative (B0, B1) tensor with positive mass, got shape "
                         f"{tuple(plan.shape)}")
    if isinstance(num_pairs, bool) or int(num_pairs) != num_pairs or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive integer, got {num_pairs!r}")
    rows = plan.sum(1).log()
    i = sample_rows(rows[None, :].expand(int(num_pairs), -1), generator)
    return i, sample_rows(plan[i].log(), generator)


def _positive(value, name: str, *, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0 \
            or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number > 0, got {value!r}")
    return float(value)


class _MassDroppingCoupler(Coupler):
    """Shared parts: the centred, scaled cost, the normalisation, ``plan`` and the draws from the plan."""

    def __init__(self, normalize: str | None) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.normalize = normalize

    def _cost(self, x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """(C', unit', s^2): C' = |x0'_i - x1'_j|^2 (B0, B1) float64 on x0's device for the centred points
        divided by s, and the cost unit in those units (the mean or largest C', or 1 / s^2 when absolute)."""
        self.validate(x0, x1)
        a, b, scale = centre_and_scale(x0.detach().flatten(1), x1.detach().flatten(1), dtype=torch.float64)
        na, nb = (a * a).sum(1), (b * b).sum(1)
        cost = (na[:, None] + nb[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)
        if self.normalize is None:
            unit = 1.0 / scale / scale
            if not unit >= torch.finfo(torch.float64).tiny:
                raise ValueError(f"normalize=None reads epsilon in units of |x0 - x1|^2, about {scale * scale:.1e} "
                                 "here, beyond float64's range; expected data of a representable squared scale: "
                                 "use normalize='mean'")
        else:
            unit = float(cost.mean() if self.normalize == "mean" else cost.max())
            unit = unit if unit > 0 else 1.0  # all points equal: every plan costs 0
        return cost, unit, scale * scale

    @staticmethod
    def _marginals(x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {"dtype": torch.float64, "device": x0.device}
        return torch.full((x0.shape[0],), 1.0 / x0.shape[0], **kwargs), torch.full((x1.shape[0],), 1.0 / x1.shape[0], **kwargs)

    @abstractmethod
    def solve(self, x0: torch.Tensor, x1: torch.Tensor) -> RelaxedPlan:
        """The plan of x0 (B0, *shape) and x1 (B1, *shape) with its mass, unnormalised."""

    def plan(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """P / sum P (B0, B1): the distribution that pairs are drawn from, summing to 1, in x0's dtype on its
        device (``solve`` gives P itself)."""
        res = self.solve(x0, x1)
        return (res.plan / res.mass).to(x0.dtype)

    def indices(self, x0: torch.Tensor, x1: torch.Tensor, *,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(i, j) of shape (B0,): B0 pairs drawn i.i.d. from P / sum P with ``generator``: i with probability
        proportional to row i's mass, then j ~ P[i, :]. Points without mass are never drawn."""
        return sample_pairs(self.solve(x0, x1).plan, x0.shape[0], generator)


class UnbalancedCoupler(_MassDroppingCoupler):
    """Unbalanced entropic OT coupling (POT's ``sinkhorn_unbalanced``, KL marginal penalties).

    Args:
        epsilon: entropic regularisation eps, in the cost unit that ``normalize`` chooses.
        reg_m: marginal relaxation reg_m > 0, in the same unit (``inf`` imposes the marginals: balanced
            entropic OT); smaller values drop more mass from points that are far from the other batch.
        normalize: ``"mean"`` (default), ``"max"`` or None (absolute); see the module docstring.
        method: POT's variant, one of ``UNBALANCED_METHODS``: ``"sinkhorn"`` (torchcfm's, the kernel
            exp(-C / eps) underflows once costs exceed about 700 eps) or the log-stabilised ones.
        max_iters, tol: POT's ``numItermax`` and ``stopThr`` (its relative change of the scalings);
            a RuntimeWarning says when ``max_iters`` is reached first.

    The plan is invariant to a common translation of both batches, and to a common scaling for
    ``normalize="mean"`` or ``"max"``. RuntimeError, never a fallback plan, when POT meets non-finite
    scalings (raise epsilon, or use a stabilised method) or returns a plan without mass.
    """

    def __init__(self, epsilon: float = 0.05, reg_m: float = 1.0, *, normalize: str | None = "mean",
                 method: str = "sinkhorn", max_iters: int = 1000, tol: float = 1e-6) -> None:
        super().__init__(normalize)
        self.epsilon = _positive(epsilon, "epsilon")
        self.reg_m = _positive(reg_m, "reg_m", allow_inf=True)
        if method not in UNBALANCED_METHODS:
            raise ValueError(f"method must be one of {UNBALANCED_METHODS}, got {method!r}")
        if isinstance(max_iters, bool) or int(max_iters) != max_iters or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
        self.method, self.max_iters, self.tol = method, int(max_iters), _positive(tol, "tol")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(epsilon={self.epsilon}, reg_m={self.reg_m}, normalize={self.normalize!r}, "
                f"method={self.method!r}, max_iters={self.max_iters}, tol={self.tol})")

    def solve(self, x0: torch.Tensor, x1: torch.Tensor) -> RelaxedPlan:
        """The unbalanced plan P (B0, B1) for masses 1/B0, 1/B1, float64 on x0's device, and its mass."""
        import ot  # here, not at module level: importing POT loads scikit-learn (about a second)
        cost, unit, s2 = self._cost(x0, x1)
        a, b = self._marginals(x0, x1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan, log = ot.unbalanced.sinkhorn_unbalanced(a, b, cost, self.epsilon * unit, self.reg_m * unit,
                                                          method=self.method, numItermax=self.max_iters,
                                                          stopThr=self.tol, log=True)
        numerical = [str(w.message) for w in caught if "umerical" in str(w.message)]
        mass = float(plan.sum())
        if numerical or not torch.isfinite(plan).all() or not mass > 0:
            raise RuntimeError(f"unbalanced Sinkhorn ({self.method!r}) failed: {numerical[0] if numerical else ''}"
                               f"{'' if numerical else 'a plan with NaN, inf or no mass'} (epsilon={self.epsilon}, "
                               f"reg_m={self.reg_m}, normalize={self.normalize!r}; cost unit {unit * s2:.3e}). "
                               "Expected a finite plan: raise epsilon or use method='sinkhorn_stabilized'")
        err = log["err"][-1] if log["err"] else 0.0
        if float(err) > self.tol:
            warnings.warn(f"unbalanced Sinkhorn stopped at max_iters={self.max_iters} with relative change "
                          f"{float(err):.2e} > tol={self.tol}; raise max_iters or epsilon", RuntimeWarning, stacklevel=2)
        return RelaxedPlan(plan, mass, unit * s2)


class PartialCoupler(_MassDroppingCoupler):
    """Partial OT coupling: a fraction ``mass`` of the uniform masses is transported, the rest stays.

    Args:
        mass: the transported mass m in (0, 1] (1 is balanced OT).
        epsilon: None (default) for the exact plan (POT's ``partial_wasserstein``: its network simplex on
            the problem extended by a dummy point on each side, on the CPU); a number > 0 for the
            entropic plan (``entropic_partial_wasserstein``, torchcfm's ``"partial"``), eps in the cost
            unit that ``normalize`` chooses.
        normalize: ``"mean"`` (default), ``"max"`` or None (absolute); only the entropic plan depends on it.
        max_iters, tol: POT's ``numItermax`` and ``stopThr`` for the entropic plan (its change of the plan
            between iterations); a RuntimeWarning says when ``max_iters`` is reached first.

    The exact plan is invariant to a common translation and scaling of both batches; the entropic one as
    the unbalanced plan (module docstring).
    """

    def __init__(self, mass: float = 0.9, *, epsilon: float | None = None, normalize: str | None = "mean",
                 max_iters: int = 1000, tol: float = 1e-9) -> None:
        super().__init__(normalize)
        self.mass = _positive(mass, "mass")
        if self.mass > 1:
            raise ValueError(f"mass is the transported fraction of the unit mass, in (0, 1]; got {mass!r}")
        self.epsilon = None if epsilon is None else _positive(epsilon, "epsilon")
        if isinstance(max_iters, bool) or int(max_iters) != max_iters or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
        self.max_iters, self.tol = int(max_iters), _positive(tol, "tol")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(mass={self.mass}, epsilon={self.epsilon}, normalize={self.normalize!r}, "
                f"max_iters={self.max_iters}, tol={self.tol})")

    @property
    def solves_on_cpu(self) -> bool:
        """The exact plan is POT's network simplex on the CPU; the entropic one runs on the input's device."""
        return self.epsilon is None

    def solve(self, x0: torch.Tensor, x1: torch.Tensor) -> RelaxedPlan:
        """The partial plan P (B0, B1) for masses 1/B0, 1/B1 with sum P = mass, float64 on x0's device."""
        import ot  # here, not at module level: importing POT loads scikit-learn (about a second)
        cost, unit, s2 = self._cost(x0, x1)
        a, b = self._marginals(x0, x1)
        m = min(self.mass, float(a.sum()), float(b.sum()))  # POT refuses m above the rounded sums of a and b
        if self.epsilon is None:
            try:
                plan = ot.partial.partial_wasserstein(a, b, cost, m=m, numItermax=EMD_MAX_ITER)
            except ValueError as e:  # POT raises ValueError when its network simplex does not reach the optimum
                raise RuntimeError(f"POT's partial_wasserstein failed on {tuple(cost.shape)} finite, centred and "
                                   f"scaled costs: {e}") from e
        else:
            plan, log = ot.partial.entropic_partial_wasserstein(a, b, cost, self.epsilon * unit, m=m,
                                                                numItermax=self.max_iters, stopThr=self.tol, log=True)
        mass = float(plan.sum())
        if not torch.isfinite(plan).all() or not mass > 0:
            raise RuntimeError(f"partial OT returned a plan with NaN, inf or no mass (mass={self.mass}, "
                               f"epsilon={self.epsilon}, normalize={self.normalize!r}; cost unit {unit * s2:.3e}); "
                               f"expected a finite plan of mass {self.mass}: raise epsilon")
        if self.epsilon is not None and log["err"] and float(log["err"][-1]) > self.tol:
            warnings.warn(f"entropic partial OT stopped at max_iters={self.max_iters} with change "
                          f"{float(log['err'][-1]):.2e} > tol={self.tol}; raise max_iters or epsilon",
                          RuntimeWarning, stacklevel=2)
        return RelaxedPlan(plan, mass, unit * s2)
