"""The outcome of a semi-discrete fit (``proximal.semidiscrete``): ``FitReport`` and the bounds of the OT cost
on the last scoring pass's samples."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from proximal.semidiscrete_scoring import _Pass

_EXACT_REPAIR_PAIRS = 2 ** 22  # most (over-full, under-full) cell pairs for the exact repair of the upper bound


@dataclasses.dataclass(frozen=True)
class FitReport:
    """Outcome of ``fit_discrete_potential``.

    tv: TV cell-mass error of the returned duals, measured on fresh samples.
    tv_noise: estimated sampling noise of ``tv`` (from two independent half-batches).
    converged: whether ``tv <= tol`` was reached (else max_time / max_iters stopped it).
    iterations, seconds, samples: solver steps, wall time, source samples drawn in total.
    threads: torch intra-op threads the solver ran with (the caller's setting is restored after).

    Transport costs (``|x - y|^2 / 2``), all three on the last batch: its n fresh source samples
    (independent of the returned duals g), as an empirical measure mu0_n.

    map_cost: ``1/n sum |x - T(x)|^2 / 2``, the cost of the fitted map T. T sends mu0_n to the
        cell masses m of the batch, not to the weights w, so this is no bound of the OT cost: it
        can lie below ``cost_lower_bound`` (by about ``tv`` times the spread of ``|y_j|^2/2 - g_j``).
    cost_lower_bound: the dual value at g, ``1/n sum |x|^2/2 + sum_j w_j |y_j|^2/2 - 1/n sum phi(x)
        - sum_j w_j g_j``: at most the OT cost ``W(mu0_n, mu1)`` by weak duality, for any g.
    cost_upper_bound: the cost of a coupling of mu0_n with mu1 (the map, with the excess mass of
        over-full cells moved to the under-full ones by an optimal transport between the cells):
        at least ``W(mu0_n, mu1)``.

    So ``cost_lower_bound <= W(mu0_n, mu1) <= cost_upper_bound`` holds on the batch (to the
    round-off of the support's dtype, in which the scores are computed), and the gap shrinks with
    ``tv`` (quickstart, 1000 moons points at tv 0.0085: 1.8979 <= W <= 1.9018, map cost 1.8822).
    Against the population cost ``W(mu0, mu1)``: the lower bound's expectation over the batch is
    the dual value at g, at most ``W(mu0, mu1)``, and ``E W(mu0_n, mu1) >= W(mu0, mu1)`` (the OT
    cost is convex in the source), so both hold in expectation, each with the batch's Monte Carlo
    noise.

    cost: deprecated alias of ``map_cost`` (it was never a bound).
    history: one ``(iteration, seconds, tv, tv_noise, batch)`` tuple per step.
    """

    method: str
    tol: float
    tv: float
    tv_noise: float
    converged: bool
    iterations: int
    seconds: float
    samples: int
    map_cost: float
    cost_lower_bound: float
    cost_upper_bound: float
    threads: int
    history: tuple[tuple[int, float, float, float, int], ...]

    @property
    def cost(self) -> float:
        """Deprecated: ``map_cost``, the fitted map's own cost (not an upper bound of the OT cost)."""
        warnings.warn("FitReport.cost is deprecated: it is map_cost, the fitted map's own cost, which can lie "
                      "below cost_lower_bound; use map_cost, or cost_lower_bound and cost_upper_bound for the "
                      "OT cost", DeprecationWarning, stacklevel=2)
        return self.map_cost


def _cost_bounds(passed: _Pass, y: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> tuple[float, float, float]:
    """``(map_cost, lower, upper)`` on the sample of one pass (its empirical measure mu0_n), in float64.

    map_cost = 1/n sum_x |x - T(x)|^2 / 2, T(x) = y_j on the hard cell C_j: the cost of the map, whose
        image has the sample's cell masses m, not w, so it bounds nothing.
    lower = 1/n sum_x |x|^2 / 2 + sum_j w_j |y_j|^2 / 2 - 1/n sum_x phi(x) - sum_j w_j g_j: the dual value
        at g, <= W(mu0_n, mu1) by weak duality (for every coupling pi, cost(pi) - lower =
        sum pi(x, k) [phi(x) - <x, y_k> + g_k] >= 0).
    upper = the cost of a coupling of mu0_n with mu1: each cell keeps min(m_j, w_j) of its mass (the same
        fraction of each of its points); the excess (m_j - w_j)_+ of over-full cells goes to the deficits
        (w_k - m_k)_+ of under-full ones by an optimal transport between cells (network simplex on the
        mean cost of cell j's points at y_k) when there are at most 2^22 such cell pairs, else in
        proportion to the deficits. Either way a feasible coupling: lower <= W(mu0_n, mu1) <= upper.
    """
    n = passed.n
    counts = passed.counts.sum(0)
    m = counts / n
    w = w / w.sum()  # the target measure: weights are checked to sum to 1 within 1e-5
    half_norms = y.square().sum(1) / 2
    mean_square, mean_best = passed.square_norm / n, passed.best_score / n
    lower = mean_square / 2 + float(w @ half_norms) - mean_best - float(w @ g)
    # sum over the points of cell j of |x - y_j|^2 / 2, from the cell sums of x and |x|^2
    cell_cost = passed.cell_squares / 2 - (passed.cell_sums * y).sum(1) + counts * half_norms
    map_cost = float(cell_cost.sum()) / n
    kept = torch.where(m > 0, torch.minimum(m, w) / m.clamp_min(1e-300), torch.zeros_like(m))  # per point of j
    upper = float(kept @ cell_cost) / n
    excess, deficit = (m - w).clamp_min(0), (w - m).clamp_min(0)
    sources, sinks = excess.nonzero().flatten(), deficit.nonzero().flatten()
    if sources.numel() == 0 or sinks.numel() == 0:
        return map_cost, lower, upper
    plan = None
    if sources.numel() * sinks.numel() <= _EXACT_REPAIR_PAIRS:
        # mean of |x - y_k|^2 / 2 over the points x of cell j: (sum |x|^2 / 2 - <sum x, y_k>) / n_j + |y_k|^2 / 2
        mean_cost = ((passed.cell_squares[sources, None] / 2 - passed.cell_sums[sources] @ y[sinks].T)
                     / counts[sources, None] + half_norms[sinks])
        a, b = excess[sources].cpu().numpy(), deficit[sinks].cpu().numpy()
        import ot  # here, not at module level: importing POT loads scikit-learn (about a second)
        with warnings.catch_warnings():  # a plan stopped early is still feasible: its cost is still a bound
            warnings.simplefilter("ignore", UserWarning)
            plan = torch.as_tensor(ot.emd(a, b * (a.sum() / b.sum()), mean_cost.cpu().numpy(), numItermax=10 ** 7),
                                   dtype=torch.float64, device=y.device)
        if not (torch.allclose(plan.sum(1), excess[sources], rtol=1e-9, atol=1e-15)
                and torch.allclose(plan.sum(0), deficit[sinks], rtol=1e-9, atol=1e-15)):
            plan = None  # not a coupling of the excess with the deficits: fall back
        else:
            upper += float((plan * mean_cost).sum())
    if plan is None:  # released points go to y_k with probability deficit_k / moved
        moved = float(deficit.sum())
        mean_target, mean_half_norm = deficit @ y / moved, float(deficit @ half_norms) / moved
        released = passed.cell_squares / 2 - passed.cell_sums @ mean_target + counts * mean_half_norm
        upper += float((1 - kept) @ released) / n
    return map_cost, lower, upper
