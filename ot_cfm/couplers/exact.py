"""Exact minibatch optimal transport for the squared Euclidean cost.

For batches x0 (B0, *shape) and x1 (B1, *shape) with uniform weights, the plan solves

    min_P  sum_ij P_ij |x0_i - x1_j|^2   s.t.  P 1 = 1/B0,  P^T 1 = 1/B1,  P >= 0.

Every feasible P has the same sum_ij P_ij (|x0_i|^2 + |x1_j|^2), so -<x0_i, x1_j> has the same
optimum. The costs are built in float64 on the input's device from the flattened points. For equal
uniform batches the ``multiscale`` backend (``ot_cfm.couplers.multiscale``, what ``auto`` uses) solves
-<x0_i, x1_j> by shortest augmenting paths, warm-started from pair-averaged coarse problems at low
dimension, and certifies the permutation with its duals on the full cost; measured against scipy, POT
and torchcfm in ``benchmarks/results/couplers_exact.md`` (2.5x to 7x faster than torchcfm from B = 256 at
d = 2 and 32, CPU time). scipy's assignment solver (``"scipy"``) gets -<x0_i, x1_j> too (about 10x faster there
than the full cost at B = 2048, d = 784), POT's network simplex (``"pot"``, any sizes and weights) the
full squared distance (1.5x slower on -<x, y> at d = 2).

Exact at every scale. Before any solver each batch whose mean is further from the origin than half
its largest entry is centred on that mean, and both are divided by one power of two
(``base.centre_and_scale``: centres and scale from a sample of rows; the batches are converted to
float64 as before and scaled and moved in place, on the input's device; for scipy the scaling is
folded into the negation of -<x0_i, x1_j>). The optimum does not move: moving x0 by c0 and x1 by
c1 changes |x0_i - x1_j|^2 by 2 <x0_i, c1 - c0> + 2 <x1_j, c0 - c1> + |c0 - c1|^2 (and -<x0_i, x1_j>
by <x0_i, c1> + <c0, x1_j> - <c0, c1>): a term of i, a term of j and a constant, whose total over any
plan with the prescribed marginals is fixed, for any sizes and weights; a common scaling multiplies
every cost by s^2. Each batch's own centre, not one common
point, and only where its offset exceeds its spread: a common one adds a column term <c, x1_j> to
-<x0_i, x1_j>, which made scipy 2.7x to 5x slower at d = 64 to 784, and moving a source batch that
needs no move reorders scipy's augmenting paths (10 % slower or faster from batch to batch). Without
this step POT's network simplex, whose pivoting compares reduced costs with absolute tolerances,
returned plans up to 130 % above the optimum on points scaled by 1e-6 (B = 1024, d = 2), and an offset
made every solver's float64 cost lose the points' differences (1e-6 to 1e-4 above the optimum at 1e6,
20 % to several times it at 1e8). POT's answers are then certified with their duals on the full cost
(``network_simplex.certify``): a plan that is not provably within 2e-10 max(max |x0|^2 + max |x1|^2, 1)
per unit mass of the optimum, on the centred and scaled points, raises RuntimeError instead of being
returned; ``multiscale`` certifies its own in the same way. scipy's ``linear_sum_assignment`` returns no duals;
it is exact on the centred points at every scale tested (1e-8 to 1e8, offsets to 1e6).

For B0 == B1 the optimal extreme plan is a permutation (Birkhoff): ``indices`` returns every
source and every target exactly once, unlike torchcfm's exact sampler, which draws B pairs with
replacement from the plan (about 1/e = 36.8 % duplicates, see ``benchmarks/couplers.py``);
``ResampledCoupler(ExactOTCoupler())`` draws them that way.
"""

from __future__ import annotations

import math

import torch
from scipy.optimize import linear_sum_assignment

from ot_cfm.couplers.base import Coupler, centre_and_scale, sample_rows
from ot_cfm.couplers.multiscale import assign
from ot_cfm.couplers.network_simplex import certificate_tolerance, certify, network_simplex

__all__ = ["ExactOTCoupler", "BACKENDS"]

#: solver backends: scipy's ``linear_sum_assignment`` and ``multiscale_assignment`` (equal sizes and
#: uniform weights only), POT's network simplex ``ot.emd`` (any sizes and weights)
BACKENDS = ("auto", "scipy", "multiscale", "pot")
#: the backends that return a permutation
_PERMUTATION_SOLVERS = ("scipy", "multiscale")

def _check_weights(w: torch.Tensor | None, n: int, name: str) -> torch.Tensor | None:
    """None, or (n,) finite non-negative masses summing to 1 (relative tolerance 1e-6), as float64."""
    if w is None:
        return None
    w = torch.as_tensor(w).detach().to(torch.float64)
    if w.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one mass per sample, got {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    if abs(float(w.sum()) - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, got {float(w.sum()):.8g}")
    return w


def _solve_on_cpu(cost: torch.Tensor, solver: str, a: torch.Tensor | None = None,
                  b: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Solve the assignment or transport problem for a (B0, B1) float64 cost on the CPU.

    The numpy boundary of the dense solvers. ``solver="scipy"`` returns (j,): the target index of
    each source, shape (B0,); ``solver="pot"`` returns (plan, u, v): the optimal plan, shape (B0, B1),
    float64, for masses a (B0,) and b (B1,) (uniform when None), and its duals u (B0,), v (B1,). All
    on ``cost``'s device. Raises RuntimeError if POT does not report an optimal solution.
    """
    c = cost.detach().cpu().numpy()
    if solver == "scipy":
        _, col = linear_sum_assignment(c)
        return (torch.from_numpy(col).to(cost.device),)
    out = network_simplex(c, None if a is None else a.cpu().numpy(), None if b is None else b.cpu().numpy())
    return tuple(torch.from_numpy(t).to(cost.device) for t in out)


def _scipy_cost(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """-<a_i, b_j> / s^2 (B0, B1), float64, for a, b the batches centred by ``centre_and_scale`` and s
    its power of two. scipy's solver is scale-free, so the division goes on one factor, folded into its
    negation (negating the (B0, d) factor, not the (B0, B1) product: one pass), unless s^-2 would leave
    float64's range; then each factor takes 1 / s."""
    a, b, scale = centre_and_scale(x0, x1, separately=True, dtype=torch.float64, scaled=False)
    exponent = math.frexp(scale)[1] - 1
    if abs(exponent) <= 480:
        a.mul_(-math.ldexp(1.0, -2 * exponent))
    else:
        a.mul_(-math.ldexp(1.0, -exponent))
        b.mul_(math.ldexp(1.0, -exponent))
    return a @ b.T


def _certified_network_simplex(a: torch.Tensor, b: torch.Tensor, w0: torch.Tensor | None,
                               w1: torch.Tensor | None) -> torch.Tensor:
    """POT's optimal plan (B0, B1) for centred, scaled points a (B0, d), b (B1, d) with masses w0, w1
    (uniform when None), certified optimal by its duals on the full cost (RuntimeError otherwise)."""
    na, nb = (a * a).sum(1), (b * b).sum(1)
    cost = (na[:, None] + nb[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)
    plan, u, v = _solve_on_cpu(cost, "pot", w0, w1)
    reduced = cost.sub_(u[:, None]).sub_(v[None, :])  # the cost is not needed any more
    # a point without mass constrains nothing: its dual can be lowered freely at no cost
    for w, view in ((w0, reduced), (w1, reduced.T)):
        if w is not None:
            view[w.to(reduced.device) == 0] = 0.0
    rows, cols = plan.nonzero(as_tuple=True)
    certify(reduced, rows, cols, certificate_tolerance(na, nb), solver="POT network simplex (ExactOTCoupler)")
    return plan


class ExactOTCoupler(Coupler):
    """Exact minibatch OT coupling for the squared Euclidean cost, on inputs of any shape (B, *shape).

    Args:
        backend: ``"scipy"`` (``linear_sum_assignment``), ``"multiscale"`` (shortest augmenting
            paths with coarse-level warm starts and an optimality certificate,
            ``ot_cfm.couplers.multiscale``), both for equal uniform batches; ``"pot"`` (``ot.emd``,
            any sizes and weights); or ``"auto"``: ``"multiscale"`` for equal uniform batches (the
            fastest at every measured batch size and dimension from B = 128, see ``choose_solver``),
            POT whenever the batch sizes differ or weights are given.

    Every backend solves the batches centred (each on its own mean, where its offset exceeds its
    spread) and scaled by one power of two: exact at any scale and offset that the float64 points
    resolve. ``"multiscale"`` and ``"pot"``
    certify their plan by LP duality and raise RuntimeError rather than return one that is not
    provably optimal (module docstring).

    ``indices`` for B0 == B1: a permutation, deterministic (the generator is unused).
    ``indices`` for B0 != B1: every source once (i = 0..B0-1), its target drawn from its row of the
    exact plan, j ~ P[i, :] / P[i, :].sum(), with ``generator``; the pairs lie on the plan's support
    (at most B0 + B1 - 1 entries). ``plan`` is the exact optimal plan in both cases.
    """

    solves_on_cpu = True

    def __init__(self, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r})"

    def choose_solver(self, b0: int, b1: int, dim: int) -> str:
        """The solver ("scipy", "multiscale" or "pot") used for batch sizes b0, b1 and flattened dimension dim."""
        if b0 != b1:
            if self.backend in _PERMUTATION_SOLVERS:
                raise ValueError(f"backend {self.backend!r} needs equal batch sizes, got {b0} and {b1}; "
                                 "use 'pot' or 'auto'")
            return "pot"
        # auto: the certified solver for every equal uniform batch. It was faster than the scipy and POT backends in
        # every measured cell from B = 128 (d = 2 to 784, benchmarks/results/couplers_exact.md); at B = 64 the scipy
        # backend is 0.1 ms faster (0.31 against 0.41 ms at d = 2), without a certificate
        return "multiscale" if self.backend == "auto" else self.backend

    def _solve(self, x0: torch.Tensor, x1: torch.Tensor, weights0=None, weights1=None) -> tuple[str, torch.Tensor]:
        self.validate(x0, x1)
        w0 = _check_weights(weights0, x0.shape[0], "weights0")
        w1 = _check_weights(weights1, x1.shape[0], "weights1")
        a, b = x0.detach().reshape(x0.shape[0], -1), x1.detach().reshape(x1.shape[0], -1)
        weighted = w0 is not None or w1 is not None
        if weighted and self.backend in _PERMUTATION_SOLVERS:
            raise ValueError(f"backend {self.backend!r} solves uniform assignments only; "
                             "use 'pot' or 'auto' with weights")
        solver = "pot" if weighted else self.choose_solver(a.shape[0], b.shape[0], a.shape[1])
        if solver == "multiscale":  # it centres, scales and certifies itself
            return solver, assign(a, b)
        if solver == "scipy":
            return solver, _solve_on_cpu(_scipy_cost(a, b), solver)[0]
        a, b, _ = centre_and_scale(a, b, separately=True, dtype=torch.float64)
        return solver, _certified_network_simplex(a, b, w0, w1)

    def indices(self, x0: torch.Tensor, x1: torch.Tensor, *, generator: torch.Generator | None = None,
                weights0: torch.Tensor | None = None,
                weights1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(i, j) of shape (B0,): i = arange(B0); j the optimal permutation (uniform, B0 == B1) or, for
        unequal sizes or weighted batches, drawn from row i of the plan with ``generator``."""
        solver, out = self._solve(x0, x1, weights0, weights1)
        i = torch.arange(x0.shape[0], device=x0.device)
        if solver in _PERMUTATION_SOLVERS:
            return i, out
        if x0.shape[0] == x1.shape[0] and weights0 is None and weights1 is None:
            j = out.argmax(dim=1)
            if torch.bincount(j, minlength=x1.shape[0]).max() != 1:
                raise RuntimeError("POT emd returned an equal-size plan that is not a permutation")
            return i, j
        return i, sample_rows(out.log(), generator)

    def plan(self, x0: torch.Tensor, x1: torch.Tensor, *, weights0: torch.Tensor | None = None,
             weights1: torch.Tensor | None = None) -> torch.Tensor:
        """The optimal plan P of shape (B0, B1) with marginals weights0, weights1 (uniform when None),
        entries summing to 1, in x0's dtype and on its device."""
        solver, out = self._solve(x0, x1, weights0, weights1)
        if solver in _PERMUTATION_SOLVERS:
            n = x0.shape[0]
            p = torch.zeros(n, n, dtype=x0.dtype, device=x0.device)
            p[torch.arange(n, device=x0.device), out] = 1.0 / n
            return p
        return out.to(x0.dtype)
