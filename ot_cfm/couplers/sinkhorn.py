"""Entropic minibatch optimal transport: log-domain Sinkhorn, torch-native, chunked.

With C_ij = |x0_i - x1_j|^2 (flattened), uniform weights a = 1/B0, b = 1/B1 and potentials f, g,

    P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps),
    f_i  = -eps log sum_j b_j exp((g_j - C_ij) / eps),    g_j = -eps log sum_i a_i exp((f_i - C_ij) / eps).

Each half-step is a log-sum-exp over row or column chunks of C, rebuilt from the points, so
memory is O(chunk_size * B + B d) and the B0 x B1 cost is never stored (Cuturi 2013; Peyre and
Cuturi, Computational Optimal Transport, sec. 4.4).

The iterations run on the batches centred by one common point and divided by one power of two s
(``base.centre_and_scale``, O(B d)): C becomes C / s^2 and epsilon epsilon / s^2, so the plan is the
same (exactly in exact arithmetic), while the squared norms no longer overflow (float32 points near
1e20 gave an all-NaN plan) nor cancel under a common offset. ``solve`` reports f, g and epsilon back
in the caller's cost units. A NaN or infinite potential raises RuntimeError: no plan or draw is ever
made from one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ot_cfm.couplers.base import Coupler, buffer_view, centre_and_scale, sample_rows

__all__ = ["SinkhornCoupler", "SinkhornResult"]

# default chunk: about 2^22 cost entries (16 MiB in float32) per block
_CHUNK_ENTRIES = 2**22
# Shifted exponents below this are raised to it: each such term is under e^-80 of the largest (1), so
# even 10^9 of them move a sum by less than 1e-25, below float64 round-off, while exp of very negative
# inputs takes a slow path (12x slower on the benchmark CPU).
_EXP_FLOOR = -80.0


@dataclass(frozen=True)
class SinkhornResult:
    """Converged (or last) potentials f (B0,), g (B1,) in cost units, with the absolute epsilon used.

    ``marginal_error`` is the L1 row-marginal error sum_i |P_i. - a_i| of the returned plan; its
    column marginals are exact up to round-off (the last half-step fits g).
    """

    f: torch.Tensor
    g: torch.Tensor
    epsilon: float
    marginal_error: float
    n_iters: int
    converged: bool


def _cost_block(x0: torch.Tensor, x1: torch.Tensor, n0: torch.Tensor, n1: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """|x0_i - x1_j|^2 for a block, from the squared norms n0 (b0,), n1 (b1,); clamped at 0 against
    round-off; written into ``out`` (shape (b0, b1)) when given."""
    block = torch.matmul(x0, x1.T, out=out)
    return block.mul_(-2.0).add_(n0[:, None]).add_(n1[None, :]).clamp_min_(0.0)


def _soft_min(potential: torch.Tensor, cost: torch.Tensor, eps: float, log_weight: float, dim: int,
              work: torch.Tensor) -> torch.Tensor:
    """-eps log sum_k w exp((potential_k - C_k) / eps), reducing ``dim`` of a cost block (potential
    along that dim), computed in ``work`` (the block's shape) as a max-shifted log-sum-exp."""
    z = torch.sub(potential.view((1, -1) if dim == 1 else (-1, 1)), cost, out=work).div_(eps)
    top = z.amax(dim, keepdim=True)
    total = z.sub_(top).clamp_min_(_EXP_FLOOR).exp_().sum(dim)
    return -eps * (top.squeeze(dim) + total.log() + log_weight)


def _non_finite_error(dtype: torch.dtype, eps: float, iteration: int) -> RuntimeError:
    return RuntimeError(f"Sinkhorn produced NaN or infinite potentials at iteration {iteration} (dtype {dtype}, "
                        f"epsilon {eps:.3e} in units of the centred, scaled cost); expected finite ones, and no plan "
                        "is made from them: raise epsilon, or pass float64 inputs")


def _check_finite(f: torch.Tensor, g: torch.Tensor, eps: float, iteration: int) -> None:
    """RuntimeError, saying what went wrong and what to change, unless both potentials are finite."""
    if not (torch.isfinite(f).all() and torch.isfinite(g).all()):
        raise _non_finite_error(f.dtype, eps, iteration)


class SinkhornCoupler(Coupler):
    """Entropic OT coupling: each source is paired with one target drawn from its row of P.

    Args:
        epsilon: entropic regularisation; relative to the mean pairwise cost mean_ij C_ij when
            ``relative`` (the default), else in absolute cost units.
        relative: whether ``epsilon`` is scaled by the mean cost (invariant to the data's scale).
        tol: stop once the L1 marginal error sum_i |P_i. - 1/B0| is below ``tol``.
        max_iters: most Sinkhorn iterations (one row and one column update each); a RuntimeWarning
            says when it is reached before ``tol``.
        chunk_size: rows or columns of C per block; default about 2^22 / max(B0, B1).

    Works on the inputs' device and dtype (float32 is stable: every exponent is a log-sum-exp).
    """

    def __init__(self, epsilon: float = 0.05, *, relative: bool = True, tol: float = 1e-3,
                 max_iters: int = 1000, chunk_size: int | None = None) -> None:
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a positive finite number, got {epsilon}")
        if not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"tol must be a positive finite number, got {tol}")
        if int(max_iters) != max_iters or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer, got {max_iters}")
        if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size}")
        self.epsilon, self.relative, self.tol = float(epsilon), relative, float(tol)
        self.max_iters, self.chunk_size = int(max_iters), chunk_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(epsilon={self.epsilon}, relative={self.relative}, tol={self.tol}, "
                f"max_iters={self.max_iters}, chunk_size={self.chunk_size})")

    def _prepare(self, x0: torch.Tensor, x1: torch.Tensor):
        """(a, b, na, nb, eps, chunk, scale): the centred points divided by ``scale``, their squared
        norms, epsilon in those units (the cost divided by scale^2) and the chunk size."""
        self.validate(x0, x1)
        a, b, scale = centre_and_scale(x0.detach().flatten(1), x1.detach().flatten(1))
        na, nb = (a * a).sum(1), (b * b).sum(1)
        if self.relative:
            # mean_ij |a_i - b_j|^2 = mean |a|^2 + mean |b|^2 - 2 <mean a, mean b>, in O(B d)
            mean_cost = float(na.mean() + nb.mean() - 2.0 * (a.mean(0) @ b.mean(0)))
            eps = self.epsilon * (mean_cost if mean_cost > 0 else 1.0)  # all points equal: every plan is optimal
        else:
            eps = self.epsilon / scale / scale
            if not eps >= torch.finfo(a.dtype).tiny:
                raise ValueError(f"epsilon={self.epsilon} (absolute) is below what {a.dtype} resolves at this data's "
                                 f"cost scale (squared extent about {scale * scale:.1e}); expected epsilon above "
                                 f"{torch.finfo(a.dtype).tiny * scale * scale:.1e}: raise it, or use relative=True")
        chunk = self.chunk_size or max(1, _CHUNK_ENTRIES // max(a.shape[0], b.shape[0]))
        return a, b, na, nb, eps, chunk, scale

    def solve(self, x0: torch.Tensor, x1: torch.Tensor) -> SinkhornResult:
        """Run Sinkhorn on x0 (B0, *shape), x1 (B1, *shape) until the marginal error is below ``tol``.

        f, g and epsilon are in the units of the cost |x0_i - x1_j|^2; RuntimeError when they overflow
        x0's dtype there (float32 points beyond about 1e19: pass float64, or use ``plan``/``indices``,
        which need only the scaled potentials)."""
        *prep, scale = self._prepare(x0, x1)
        res = self._run(*prep)
        s2 = scale * scale
        f, g = res.f * s2, res.g * s2
        if not (torch.isfinite(f).all() and torch.isfinite(g).all()):
            raise RuntimeError(f"the Sinkhorn potentials in cost units overflow {f.dtype} (cost scale {s2:.1e}); "
                               "expected a cost that the inputs' dtype can hold: pass float64 inputs, or use plan() "
                               "or indices(), which work on the scaled cost")
        return SinkhornResult(f, g, res.epsilon * s2, res.marginal_error, res.n_iters, res.converged)

    def _run(self, a, b, na, nb, eps, chunk) -> SinkhornResult:
        log_a, log_b = -math.log(a.shape[0]), -math.log(b.shape[0])
        n0, n1 = a.shape[0], b.shape[0]
        # Buffers reused by every half-step (see ``buffer_view``); a cost that fits one block is built once.
        work = torch.empty(2, min(chunk, max(n0, n1)) * max(n0, n1), dtype=a.dtype, device=a.device)
        whole = _cost_block(a, b, na, nb, out=buffer_view(work[1], (n0, n1))) if chunk >= max(n0, n1) else None

        def block(rows: slice, cols: slice) -> torch.Tensor:
            if whole is not None:
                return whole[rows, cols]
            shape = (len(range(n0)[rows]), len(range(n1)[cols]))
            return _cost_block(a[rows], b[cols], na[rows], nb[cols], out=buffer_view(work[1], shape))

        def half_step(potential: torch.Tensor, dim: int) -> torch.Tensor:
            """The row potential f from g (dim = 1) or the column potential g from f (dim = 0), block by block."""
            parts = []
            for s in range(0, n0 if dim == 1 else n1, chunk):
                c = block(slice(s, s + chunk), slice(None)) if dim == 1 else block(slice(None), slice(s, s + chunk))
                log_weight = log_b if dim == 1 else log_a
                parts.append(_soft_min(potential, c, eps, log_weight, dim, buffer_view(work[0], c.shape)))
            return torch.cat(parts)

        f = torch.zeros_like(na)
        g = half_step(f, 0)
        err = math.inf
        for it in range(1, self.max_iters + 1):
            f_new = half_step(g, 1)
            # row sums of the current plan are a_i exp((f_i - f_new_i) / eps)
            err = float(torch.exp(log_a + (f - f_new) / eps).sub(math.exp(log_a)).abs().sum())
            if math.isnan(err):  # a NaN potential (an infinite error alone can be a far start)
                raise _non_finite_error(f.dtype, eps, it)
            if err <= self.tol:
                _check_finite(f, g, eps, it)
                return SinkhornResult(f, g, eps, err, it, True)
            f = f_new
            g = half_step(f, 0)
        _check_finite(f, g, eps, self.max_iters)
        warnings.warn(f"Sinkhorn stopped at max_iters={self.max_iters} with marginal error {err:.2e} > tol={self.tol}; "
                      "raise max_iters or epsilon", RuntimeWarning, stacklevel=3)
        return SinkhornResult(f, g, eps, err, self.max_iters, False)

    def indices(self, x0: torch.Tensor, x1: torch.Tensor, *,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(i, j) of shape (B0,): i = arange(B0), j_i ~ P[i, :] / a_i, drawn chunk by chunk with ``generator``."""
        *prep, _ = self._prepare(x0, x1)
        res = self._run(*prep)
        a, b, na, nb, eps, chunk = prep
        j = torch.cat([sample_rows((res.g - _cost_block(a[s:s + chunk], b, na[s:s + chunk], nb)) / eps, generator)
                       for s in range(0, a.shape[0], chunk)])
        return torch.arange(a.shape[0], device=x0.device), j

    def plan(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """The entropic plan P of shape (B0, B1) (materialised: for moderate batches), on x0's device."""
        *prep, _ = self._prepare(x0, x1)
        res = self._run(*prep)
        a, b, na, nb, eps, _ = prep
        logp = (res.f[:, None] + res.g[None, :] - _cost_block(a, b, na, nb)) / eps
        return torch.exp(logp - math.log(a.shape[0] * b.shape[0]))
