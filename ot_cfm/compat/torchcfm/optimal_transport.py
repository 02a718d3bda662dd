"""torchcfm's ``optimal_transport`` module (``OTPlanSampler``, ``wasserstein``) on ot-cfm's couplers.

Plans come from ``ExactOTCoupler`` (certified exact OT), ``SinkhornCoupler`` (log-domain, absolute epsilon
= ``reg``), ``UnbalancedCoupler`` (reg, reg_m) and ``PartialCoupler`` (entropic, all the mass, as torchcfm's
"partial"), as numpy arrays (B0, B1) summing to 1 (torchcfm's unbalanced plans keep their own mass; only
the pairs drawn from them count, and those are the same). Sampling from a plan uses numpy's global
generator, as torchcfm does, so that ``np.random.seed`` reproduces a torchcfm user's run and torch's random
stream (t, eps) is left untouched; pass ``rng`` (a ``numpy.random.Generator``) to avoid global state.

``OTPlanSampler.ot_fn`` is torchcfm's attribute: POT's solver of the method as a function (a, b, M) -> plan
(the couplers take points, not a cost matrix). A script that replaces it gets torchcfm's behaviour:
``get_map`` then calls it on torchcfm's marginals and cost, and the plan is sampled with replacement.

Deliberate difference: for ``method="exact"`` with equal batch sizes, ``sample_plan`` returns the optimal
permutation (every x0 once, in its order, with its partner) unless ``replace=True`` asks for torchcfm's
sampling with replacement.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional, Union

import numpy as np
import ot as pot
import torch

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.sinkhorn import SinkhornCoupler
from ot_cfm.couplers.unbalanced import PartialCoupler, UnbalancedCoupler
from ot_cfm.utils.validation import check_batch

__all__ = ["OTPlanSampler", "wasserstein"]

METHODS = ("exact", "sinkhorn", "unbalanced", "partial")


def _flat(x: torch.Tensor) -> torch.Tensor:
    """x (B, *dim) as (B, prod(dim)), detached."""
    return x.detach().reshape(x.shape[0], -1)


def _choice(size: int, p: np.ndarray, draws: int, replace: bool, rng: np.random.Generator | None) -> np.ndarray:
    """``draws`` indices in [0, size) with probabilities p, from ``rng`` or numpy's global generator."""
    return (rng or np.random).choice(size, p=p, size=draws, replace=replace)


def _pot_solver(method: str, reg: float, reg_m: float, num_threads: Union[int, str]):
    """POT's solver of ``method`` with its settings bound, as torchcfm's ``ot_fn``: (a (B0,), b (B1,), M (B0, B1)) -> plan."""
    if method == "exact":
        return partial(pot.emd, numThreads=num_threads)
    if method == "sinkhorn":
        return partial(pot.sinkhorn, reg=reg)
    if method == "unbalanced":
        return partial(pot.unbalanced.sinkhorn_knopp_unbalanced, reg=reg, reg_m=reg_m)
    return partial(pot.partial.entropic_partial_wasserstein, reg=reg)


class OTPlanSampler:
    """Pairs drawn from the OT plan (squared Euclidean cost) between a source and a target minibatch.

    Args:
        method: "exact" (``ExactOTCoupler``), "sinkhorn" (``SinkhornCoupler``), "unbalanced" (``UnbalancedCoupler``)
            or "partial" (``PartialCoupler`` with mass 1 and epsilon = reg: POT's entropic partial OT).
        reg: entropic regularisation of "sinkhorn", "unbalanced" and "partial", in cost units.
        reg_m: the marginal relaxation of "unbalanced".
        normalize_cost: divide the cost by its maximum first (epsilon and reg_m read in that unit).
        num_threads: POT's threads in ``ot_fn`` for "exact"; ot-cfm's exact solvers choose their own.
        warn: accepted for torchcfm's signature; a non-finite plan raises instead of warning.
        rng: a ``numpy.random.Generator`` for the draws (numpy's global generator when None).

    ``ot_fn``: POT's solver of ``method`` with these settings, (a, b, M) -> plan, as torchcfm's. Plans come from
    ot-cfm's couplers while it is left as it is; a function assigned to it is used as torchcfm uses it.
    """

    def __init__(self, method: str, reg: float = 0.05, reg_m: float = 1.0, normalize_cost: bool = False,
                 num_threads: Union[int, str] = 1, warn: bool = True, rng: Optional[np.random.Generator] = None):
        if method not in METHODS:
            raise ValueError(f"Unknown method: {method!r}; expected one of {METHODS}")
        if method != "exact" and not (math.isfinite(reg) and reg > 0):
            raise ValueError(f"reg must be finite and > 0 for method={method!r}, got {reg}")
        self.method, self.reg, self.reg_m = method, reg, reg_m
        self.normalize_cost, self.num_threads, self.warn, self.rng = normalize_cost, num_threads, warn, rng
        self.ot_fn = self._default_ot_fn = _pot_solver(method, reg, reg_m, num_threads)

    @property
    def _own_plans(self) -> bool:
        """Whether the plans come from ot-cfm's couplers: ``ot_fn`` has not been replaced."""
        return self.ot_fn is self._default_ot_fn

    def _coupler(self, x0: torch.Tensor, x1: torch.Tensor):
        if self.method == "exact":
            return ExactOTCoupler()
        unit = "max" if self.normalize_cost else None
        if self.method == "unbalanced":
            return UnbalancedCoupler(epsilon=self.reg, reg_m=self.reg_m, normalize=unit)
        if self.method == "partial":
            return PartialCoupler(mass=1.0, epsilon=self.reg, normalize=unit)
        epsilon = self.reg
        if self.normalize_cost:
            epsilon *= float(torch.cdist(x0.double(), x1.double()).max() ** 2)
        # POT's sinkhorn (torchcfm's) stops at a marginal error of 1e-9 or after 1000 iterations
        return SinkhornCoupler(epsilon=epsilon, relative=False, tol=1e-8, max_iters=1000)

    def get_map(self, x0: torch.Tensor, x1: torch.Tensor) -> np.ndarray:
        """The plan (B0, B1) between x0 (B0, *dim) and x1 (B1, *dim) as a numpy array: ot-cfm's coupler's, float64,
        summing to 1; or, once ``ot_fn`` is replaced, ``ot_fn(a, b, M)`` for torchcfm's uniform a, b and cost
        M_ij = |x0_i - x1_j|^2 (divided by its maximum with ``normalize_cost``), as torchcfm calls it."""
        if self._own_plans:
            x0, x1 = _flat(x0).to(torch.float64), _flat(x1).to(torch.float64)  # entries such as 1/B in float64
            plan = self._coupler(x0, x1).plan(x0, x1).cpu().numpy()
        else:
            cost = torch.cdist(_flat(x0), _flat(x1)) ** 2
            cost = cost / cost.max() if self.normalize_cost else cost
            plan = np.asarray(self.ot_fn(pot.unif(x0.shape[0]), pot.unif(x1.shape[0]), cost.cpu().numpy()))
            if plan.shape != (x0.shape[0], x1.shape[0]):
                raise ValueError(f"ot_fn returned a plan of shape {plan.shape}, expected {(x0.shape[0], x1.shape[0])} "
                                 "(B0, B1)")
        if not np.all(np.isfinite(plan)) or plan.sum() <= 0:
            raise FloatingPointError(f"the {self.method} plan is not finite or has no mass (reg={self.reg}); "
                                     "a larger reg or normalize_cost=True may help")
        return plan

    def sample_map(self, pi: np.ndarray, batch_size: int, replace: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(i, j): ``batch_size`` index pairs drawn from the plan pi (B0, B1), with or without replacement."""
        p = np.asarray(pi, dtype=np.float64).reshape(-1)
        choices = _choice(p.size, p / p.sum(), batch_size, replace, self.rng)
        return np.divmod(choices, pi.shape[1])

    def _indices(self, x0: torch.Tensor, x1: torch.Tensor, replace: Optional[bool]):
        """Index pairs (i, j): the optimal permutation for exact OT of equal sizes (unless replace=True or ``ot_fn``
        was replaced), else ``batch_size`` = B0 draws from the plan (with replacement unless replace=False)."""
        if self.method == "exact" and self._own_plans and x0.shape[0] == x1.shape[0] and not replace:
            return ExactOTCoupler().indices(_flat(x0), _flat(x1))
        i, j = self.sample_map(self.get_map(x0, x1), x0.shape[0], replace=True if replace is None else replace)
        return torch.as_tensor(i, device=x0.device), torch.as_tensor(j, device=x1.device)

    def sample_plan(self, x0: torch.Tensor, x1: torch.Tensor, replace: Optional[bool] = None):
        """(x0[i], x1[j]) for pairs (i, j) of the plan (see the module docstring for ``replace``)."""
        i, j = self._indices(x0, x1, replace)
        return x0[i], x1[j]

    def sample_plan_with_labels(self, x0: torch.Tensor, x1: torch.Tensor, y0=None, y1=None,
                                replace: Optional[bool] = None):
        """(x0[i], x1[j], y0[i], y1[j]) for pairs (i, j) of the plan; labels None stay None."""
        i, j = self._indices(x0, x1, replace)
        return x0[i], x1[j], (y0[i] if y0 is not None else None), (y1[j] if y1 is not None else None)

    def sample_trajectory(self, X: torch.Tensor) -> np.ndarray:
        """Trajectories (bs, times, *dim) through populations X (bs, times, *dim): from each point at time k
        the next point is drawn from its row of the plan between times k and k + 1 (the partner itself for
        exact OT), as a numpy array like torchcfm's."""
        rows = np.arange(X.shape[0])
        path = [X[:, 0][rows]]
        for k in range(X.shape[1] - 1):
            pi = self.get_map(X[:, k], X[:, k + 1])[rows]
            cdf = np.cumsum(pi / pi.sum(axis=1, keepdims=True), axis=1)
            u = (self.rng or np.random).random(len(rows))[:, None]
            rows = np.minimum((cdf < u).sum(axis=1), pi.shape[1] - 1)
            path.append(X[:, k + 1][rows])
        return np.stack([p.detach().cpu().numpy() for p in path], axis=1)


def wasserstein(x0: torch.Tensor, x1: torch.Tensor, method: Optional[str] = None, reg: float = 0.05, power: int = 2,
                **kwargs) -> float:
    """W_power (power 1 or 2) between the empirical measures of x0 (B0, *dim) and x1 (B1, *dim), uniform weights:
    exact (POT's emd2, method "exact" or None) or entropic (POT's sinkhorn2 with ``reg``), on the cost
    |x0_i - x1_j|^power computed as torchcfm does, so that values equal torchcfm's. NaN or inf entries raise
    ValueError, as in ``OTPlanSampler`` (POT's emd2 returned 0.0 for NaN points)."""
    check_batch(x0, "x0")
    check_batch(x1, "x1")
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power}")
    if method in ("exact", None):
        solve = pot.emd2
    elif method == "sinkhorn":
        def solve(a, b, m, **kw):
            return pot.sinkhorn2(a, b, m, reg=reg, **kw)
    else:
        raise ValueError(f"Unknown method: {method!r}; expected 'exact', 'sinkhorn' or None")
    x0, x1 = _flat(x0), _flat(x1)
    cost = torch.cdist(x0, x1) ** power
    value = float(solve(pot.unif(x0.shape[0]), pot.unif(x1.shape[0]), cost.cpu().numpy(), numItermax=int(1e7)))
    return math.sqrt(value) if power == 2 else value
