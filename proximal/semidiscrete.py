"""Semi-discrete OT solver: dual weights ``g`` of ``phi(x) = max_j <x, y_j> - g_j``.

Target ``mu1 = sum_j w_j delta_{y_j}``, source ``mu0`` (default N(0, I_d)). The dual

    G(g) = E_{x~mu0}[max_j <x, y_j> - g_j] + sum_j w_j g_j

is convex, with gradient ``dG/dg_j = w_j - mu0(C_j)`` (Laguerre cells ``C_j``) and Hessian the
graph Laplacian of the facet weights ``H_jk = int_{C_j cap C_k} rho / |y_j - y_k|``; its minimiser
gives ``mu0(C_j) = w_j`` (Kitagawa, Merigot & Thibert, JEMS 2019). Every quantity is a Monte
Carlo (or randomised quasi-Monte Carlo) estimate on fresh source samples, drawn in chunks.

Methods:
  ``"newton"`` (default for N <= 4096): path following on the entropic dual
  ``G_eps(g) = E[eps log sum_j exp((<x, y_j> - g_j) / eps)] + sum_j w_j g_j`` (soft assignments
  ``p = softmax((<x, y> - g) / eps)`` kept on each sample's 8 best cells), whose Hessian is the
  Laplacian ``L = E[diag(p) - p p^T] / eps`` (estimated on the first 2^20 samples of each batch;
  in the hard stage only those pay for a top-k, the rest for an argmax). Steps
  ``g <- g + L^+ (m_eps - w)``, scaled down to move no dual weight by more than ``2 eps``; eps
  starts at the median spread of the 8 best scores and halves after each unscaled step, 8
  times. A cell whose curvature is below the
  damping (an empty or nearly empty cell: its soft mass is then exponential in its dual,
  ``m_j ~ exp(-g_j / eps)``) takes the Sinkhorn move ``eps log(m_j / w_j)`` within ``2 eps``
  instead, exact for a cell alone, and the others the Newton step given it; only these others
  scale the step. Such cells are many on a high-dimensional support (hubness: the Gaussian
  start leaves 98 of the 1438 digits cells empty), and before, their damping-limited moves of
  20 eps scaled every step down tenfold and eps never halved. Then the residual is the hard mass
  error ``m - w`` with the Laplacian as curvature, smoothed at the fixed eps ``eps_0 / 64``
  (``eps_0`` the first eps), in a trust region of radius r (moves within ``2 r``): r starts at
  ``eps_0``, doubles after a step that had to be scaled (up to ``eps_0``) and halves after one that
  did not (down to the last entropic eps), and a step after which the measured TV rose by more
  than the noise of both measurements is undone with r halved. A Levenberg-Marquardt term
  ``mu w / eps`` on the diagonal keeps empty cells finite (in the hard stage ``mu w / eps_0``); mu
  adapts as in Marquardt's method: it starts at 1, halves after a step that lowered the measured TV
  and doubles after one that raised it, within [0.05, 10]. The hard stage's curvature, radius and
  damping were tied to the last entropic eps before (the bound, the smoothing and the damping's eps
  all ``eps_0 / 1024``): its Laplacian was mostly sampling noise (2^20 samples; on 1000 moons points the
  smallest diagonal 1/170 of the median) and the damping ``0.05 w / eps`` seven times the
  curvature, so each pass took a damped gradient step (TV 0.0057 -> 0.0049 in 9 passes of 2^21
  samples), while the errors left sit in smooth modes whose Newton moves are hundreds of
  ``eps_0 / 1024``: one step at smoothing ``eps_0 / 32`` to ``eps_0 / 128`` with damping
  ``0.05 w / eps_0`` halves the TV (0.0055 -> 0.0028 on 2^22 fresh samples), at ``eps_0 / 8`` 0.0042,
  at ``eps_0 / 1024`` 0.0051. With 8 entropic halvings instead of 10 (the last two barely moved the
  TV) 1000 moons points reach tol 0.005 after one hard step: 21.6 s against 93.5 s before (seed 0,
  medians of 3 interleaved runs, one thread, load 2); seed 1 in 18 s, where the old rule stalled at
  TV 0.0064 after 300 s. Tol 0.01 (moons) and the digits fit (converged at eps ``eps_0 / 16``)
  end before the hard stage: the same steps and times. The start is the c-transform of the Gaussian (Bures)
  map onto the support's mean m and covariance S, ``g_j = (y_j - m)^T S^{+1/2} (y_j - m) / 2``. The
  batch doubles whenever the error is at the noise level, so the last batches dominate the cost.
  ``"sgd"`` (baseline): stochastic gradient steps ``g <- g + gamma_k s (m - w) / (m + w)``
  (``s`` the score spread, ``gamma_k = 0.5 / sqrt(1 + k / 10)``) with the same batch growth.

Quality: ``TV = 1/2 sum_j |mu0(C_j) - w_j|`` on each batch, which is fresh for the current
iterate (it was not used to compute it); the batch is drawn as two independent halves and
``noise = 1/4 sum_j |m^A_j - m^B_j|`` estimates the sampling floor of that TV estimate. The last
batch also brackets the OT cost of its own samples: the dual value at g below, the cost of a
repaired coupling above (``FitReport``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable

import torch

from ot_cfm.utils.parallelism import available_cores, torch_threads
from proximal.discrete import DiscreteBrenierPotential

__all__ = ["FitReport", "fit_discrete_potential", "cell_masses"]

Source = Callable[[int, torch.Generator], torch.Tensor]


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


@dataclasses.dataclass
class _Pass:
    """Sums over one batch, drawn as two independent halves."""

    counts: torch.Tensor  # (2, N) hard cell counts of each half
    n: int
    best_score: float  # sum of max_j <x, y_j> - g_j
    square_norm: float  # sum of |x|^2
    gap_scale: float  # median gap between the best and the k-th best score
    cell_sums: torch.Tensor  # (N, d) sum of the samples x in each hard cell, float64
    cell_squares: torch.Tensor  # (N,) sum of |x|^2 over each hard cell, float64
    soft_counts: torch.Tensor | None = None  # (N,) sum of softmax((<x, y> - g) / eps) over the batch
    hessian: torch.Tensor | None = None  # (N, N) Laplacian of the entropic dual, per sample

    @property
    def masses(self) -> torch.Tensor:
        return self.counts.sum(0) / self.n

    def tv(self, weights: torch.Tensor) -> tuple[float, float]:
        half = self.counts / (self.n / 2)
        tv = 0.5 * float((self.masses - weights).abs().sum())
        noise = 0.25 * float((half[0] - half[1]).abs().sum())
        return tv, noise


def _gaussian_qmc(dim: int, seed: int) -> Callable[[int], torch.Tensor]:
    """Randomised QMC stream of N(0, I_dim): scrambled Sobol points through the normal quantile."""
    engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    tiny = 2.0 ** -40

    def draw(n: int) -> torch.Tensor:
        return torch.special.ndtri(engine.draw(n, dtype=torch.float64).clamp_(tiny, 1 - tiny))

    return draw


def _stream(source: Source | None, dim: int, generator: torch.Generator, qmc: bool,
            device: torch.device, dtype: torch.dtype) -> Callable[[int], torch.Tensor]:
    """A fresh, independent sample stream ``draw(n) -> (n, dim)`` on ``device`` / ``dtype``."""
    if source is None and qmc:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        qmc_draw = _gaussian_qmc(dim, seed)
        return lambda n: qmc_draw(n).to(device=device, dtype=dtype)
    if source is None:
        return lambda n: torch.randn(n, dim, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    def draw(n: int) -> torch.Tensor:
        x = source(n, generator)
        if not isinstance(x, torch.Tensor) or x.shape != (n, dim):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"source(n, generator) must return a tensor of shape ({n}, {dim}), got {shape}")
        if not torch.isfinite(x).all():
            raise ValueError("source returned NaN or inf samples")
        return x.to(device=device, dtype=dtype)

    return draw


_ENTROPIC_STAGES = 8  # eps halvings before the hard stage
_TRUST = 2.0  # largest Newton move of a dual weight, in units of eps
_HARD_SMOOTHING = 2.0 ** -6  # eps of the hard stage's Laplacian, in units of the first eps
_FLOOR = 0.05  # least Levenberg-Marquardt damping mu, in units of w_j / eps (a cell of mass w_j softened by eps)
_MAX_DAMPING = 10.0  # largest mu
_DENSE_LIMIT = 4096  # largest N for the dense Newton systems
_TOP_K = 8  # soft assignments are kept on each sample's 8 best cells
_EXACT_REPAIR_PAIRS = 2 ** 22  # most (over-full, under-full) cell pairs for the exact repair of the upper bound
_HESSIAN_SAMPLES = 2 ** 20  # samples of a batch whose top-k pairs feed the Laplacian (digits: 2^16 stalled)
_GAP_ROWS = 2 ** 12  # the first samples of a pass whose top-k gaps give its gap scale, whatever the chunk size


@torch.no_grad()
def _batch_pass(y: torch.Tensor, g: torch.Tensor, draws: tuple[Callable, Callable], n: int, chunk: int,
                eps: float | None = None, hessian_samples: int = _HESSIAN_SAMPLES, soft: bool = True) -> _Pass:
    """Scores ``s = <x, y_j> - g_j`` of n fresh samples (two halves, in chunks).

    Always: hard cell counts (argmax of s) and sums. With ``eps``: the Laplacian
    ``diag(sum p) - sum p p^T`` of ``p = softmax_j(s / eps)`` on the top-k cells of the first
    ``hessian_samples`` samples, and if ``soft``, the soft counts ``sum_x p`` over all samples.
    Only rows that need soft assignments pay for a top-k; the others take a max.
    """
    num = y.shape[0]
    k = min(_TOP_K, num)
    counts = torch.zeros(2, num, dtype=torch.float64, device=y.device)
    soft_counts = torch.zeros(num, dtype=torch.float64, device=y.device) if eps is not None and soft else None
    pair_weights = torch.zeros(num * num, dtype=torch.float64, device=y.device) if eps is not None else None
    cell_sums = torch.zeros(num, y.shape[1], dtype=torch.float64, device=y.device)
    cell_squares = torch.zeros(num, dtype=torch.float64, device=y.device)
    best_score = square_norm = 0.0
    gaps, gap_rows, seen = [], 0, 0
    yt, neg_g = y.T.contiguous(), -g.to(y.dtype)
    for half, draw in enumerate(draws):
        for start in range(0, n // 2, chunk):
            x = draw(min(chunk, n // 2 - start))
            scores = torch.addmm(neg_g, x, yt)
            square_norm += float(x.square().sum(dtype=torch.float64))
            # rows [0, ranked) need their top-k scores: all of them for soft counts, else the Hessian's
            ranked = x.shape[0] if soft_counts is not None or gap_rows < _GAP_ROWS else \
                (min(x.shape[0], hessian_samples - seen) if pair_weights is not None else 0)
            best, arg = scores[ranked:].max(1)
            best_score += float(best.sum(dtype=torch.float64))
            top = idx = None
            if ranked:
                top, idx = scores[:ranked].topk(k, dim=1)
                best_score += float(top[:, 0].sum(dtype=torch.float64))
            cells = arg if idx is None else torch.cat([idx[:, 0], arg])  # hard cell of each row
            counts[half] += torch.bincount(cells, minlength=num)
            x64 = x.to(torch.float64)
            cell_sums.index_add_(0, cells, x64)
            cell_squares.index_add_(0, cells, x64.square().sum(1))
            if ranked == 0:
                continue
            if gap_rows < _GAP_ROWS:
                gaps.append((top[:, 0] - top[:, -1])[:_GAP_ROWS - gap_rows])
                gap_rows += gaps[-1].shape[0]
            if eps is None:
                continue
            p = torch.softmax((top - top[:, :1]).double() / eps, dim=1)
            if soft_counts is not None:
                soft_counts.index_add_(0, idx.flatten(), p.flatten())
            take = max(0, min(ranked, hessian_samples - seen))
            if take:
                keys = (idx[:take, :, None] * num + idx[:take, None, :]).flatten()
                pair_weights.index_add_(0, keys, (p[:take, :, None] * p[:take, None, :]).flatten())
                seen += take
    hessian = None
    if eps is not None:
        pair = pair_weights.reshape(num, num)
        hessian = (torch.diag(pair.sum(1)) - pair) / (eps * max(seen, 1))
    gap_scale = float(torch.cat(gaps).median()) if k > 1 and gaps else 1.0
    return _Pass(counts, n, best_score, square_norm, gap_scale, cell_sums, cell_squares, soft_counts, hessian)


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


def _newton_direction(hessian: torch.Tensor, residual: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Solve ``(L + diag(floor)) delta = residual``; L a graph Laplacian (PSD, kernel = constants).

    ``floor`` (N,) is a Levenberg-Marquardt term that keeps cells without curvature (empty cells)
    at a finite move.
    """
    return torch.linalg.solve(hessian + torch.diag(floor), residual)


def _newton_step(hessian: torch.Tensor, masses: torch.Tensor, w: torch.Tensor, eps: float, damping: float,
                 entropic: bool, damping_eps: float | None = None) -> tuple[torch.Tensor, bool]:
    """One damped step ``delta`` (N,) of the duals (``g <- g + delta``) and whether it was taken unscaled.

    hessian: (N, N) Laplacian; masses: (N,) soft (entropic stage) or hard cell masses; w: (N,) weights.
    Damping ``D = damping w / damping_eps`` (default ``damping_eps = eps``). In the entropic stage the
    loose cells, ``L_jj < D_j``, move by ``eps log(max(m_j, w_j e^-2) / w_j)`` clamped to ``2 eps``
    (Sinkhorn's update, exact for a cell whose soft mass ``m_j ~ exp(-g_j / eps)`` is alone); the held
    cells solve ``(L_HH + D_H) d_H = (m - w)_H - L_HU d_U``. If a held move exceeds ``2 eps`` the held
    moves are scaled to that bound (not unscaled). In the hard stage every cell is held. Returned centred to mean 0.
    """
    floor = damping * w / (damping_eps or eps)
    loose = torch.diagonal(hessian) < floor if entropic else torch.zeros_like(w, dtype=torch.bool)
    held = ~loose
    delta = torch.zeros_like(w)
    bound = w[loose] * math.exp(-_TRUST)
    delta[loose] = (eps * torch.log(torch.maximum(masses[loose], bound) / w[loose])).clamp(-_TRUST * eps, _TRUST * eps)
    if bool(held.any()):
        rhs = (masses - w)[held] - hessian[held][:, loose] @ delta[loose]
        delta[held] = _newton_direction(hessian[held][:, held], rhs, floor[held])
    delta -= delta.mean()
    largest = float(delta[held].abs().max()) if bool(held.any()) else 0.0
    if largest > _TRUST * eps:
        delta[held] *= _TRUST * eps / largest
        return delta, False
    return delta, True


def _gaussian_start(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Starting duals (N,) float64 for support y (N, d), weights w (N,): the c-transform of the Brenier potential
    ``<m, x> + x^T S^{1/2} x / 2`` of the Gaussian N(m, S) with the support's mean and covariance,

        g_j = (y_j - m)^T S^{+1/2} (y_j - m) / 2      (S^{+1/2}: inverse root on the range of S),

    centred to mean 0. Exact for a Gaussian target: its Laguerre cell of y_j holds the x whose image
    T(x) = m + S^{1/2} x is nearest to y_j in the metric S^{+1/2}. The isotropic Voronoi start (S = s^2 I, the
    previous one) leaves many cells of an anisotropic support empty: on the digits training split (d = 64,
    N = 1438; 2^17 samples) 218 empty cells and TV 0.66, against 98 and 0.49 from this start.
    """
    centred = y - w @ y
    values, vectors = torch.linalg.eigh((centred * w[:, None]).T @ centred)
    keep = values > values.max().clamp_min(0) * 1e-10
    inverse_root = (vectors[:, keep] / values[keep].sqrt()) @ vectors[:, keep].T
    g = 0.5 * ((centred @ inverse_root) * centred).sum(1)
    return g - g.mean()


def cell_masses(potential: DiscreteBrenierPotential, n: int, *, source: Source | None = None,
                generator: torch.Generator | int | None = None, chunk: int = 2 ** 14) -> tuple[torch.Tensor, float]:
    """Monte Carlo cell masses ``mu0(C_j)`` (N,) of a discrete potential on n fresh source samples.

    Returns ``(masses, tv)`` with ``tv = 1/2 sum_j |masses_j - w_j|``. Plain i.i.d. samples (no
    QMC), so the TV estimate has the familiar noise floor ``~0.4 sqrt(N / n)``.
    """
    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2 (samples are drawn in two equal halves), got {n!r}")
    generator = _as_generator(generator)
    y = potential.support
    draw = _stream(source, y.shape[1], generator, False, y.device, y.dtype)
    passed = _batch_pass(y, potential.dual_weights.to(y.dtype), (draw, draw), 2 * (n // 2), chunk, None)
    return passed.masses, passed.tv(potential.weights.to(torch.float64))[0]


def _as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(0 if generator is None else int(generator))


def _auto_threads(current: int) -> int:
    """Threads for ``threads=None``: the cores that the 1-minute load average leaves idle (of those this
    process may run on), at most torch's current setting, at least one."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # not on Windows
    return max(1, min(current, int(available_cores() - load)))


def fit_discrete_potential(support: torch.Tensor, weights: torch.Tensor | None = None, *,
                           source: Source | None = None, tol: float = 1e-2, max_time: float = 300.0,
                           max_iters: int = 10_000, method: str = "auto",
                           generator: torch.Generator | int | None = None, progress: bool = True,
                           qmc: bool = True, batch_size: int | None = None,
                           chunk_size: int | None = None, threads: int | None = None) -> DiscreteBrenierPotential:
    """Fit the dual weights of the semi-discrete OT map from ``source`` to ``sum_j w_j delta_{y_j}``.

    Args:
        support: (N, d) distinct finite target points, float32 or float64; computations run on its
            device and dtype. float16 and bfloat16 are refused (see Raises).
        weights: (N,) non-negative masses summing to 1 (default uniform).
        source: ``source(n, generator) -> (n, d)`` sampler; None for N(0, I_d).
        tol: stop once the TV cell-mass error, measured on fresh samples, is <= tol.
        max_time, max_iters: other stopping rules (seconds, steps); a warning says tol was missed.
        method: ``"newton"`` (N <= 4096), ``"sgd"`` or ``"auto"`` (newton where allowed, the measured winner).
        generator: ``torch.Generator`` or integer seed of every draw (default seed 0).
        progress: show a tqdm bar with the current TV.
        qmc: for the default Gaussian source, draw randomised (scrambled Sobol) QMC points.
        batch_size: first batch size (default ``max(2^14, 16 N)`` rounded up to a power of two).
        chunk_size: samples scored at once (memory ~ chunk_size * N).
        threads: torch intra-op threads for the fit (``torch.set_num_threads``, process-wide while
            it runs; the previous setting is restored afterwards, also on errors). None (default):
            int(cores - 1-minute load average), at most torch's current setting,
            at least one. Measured on 2 cores shared with other jobs (``benchmarks/proximal.py
            --threads-check``, medians of 3, one and two threads interleaved): two threads took
            1.8 to 5.7 times as long as one (moons N = 200 and 1000, digits, N = 10^4 in d = 64,
            load 1 to 5), 3.5 to 6.7 times beside one more busy process, and 0.57 times once (200
            points, the second core idle). A second thread pays only on a core nobody else wants,
            and the load average sees new jobs late, so the rule is conservative: on 2 cores it
            takes two threads only at load 0. The choice is in ``fit_report.threads``.

    Returns:
        A ``DiscreteBrenierPotential`` with the duals centred to mean zero and the ``FitReport``
        attached as ``potential.fit_report`` (TV, the transport-cost bounds, the threads used).

    Raises:
        ValueError: bad arguments, or float16 / bfloat16 support: scores ``<x, y_j> - g_j`` in half
            precision put 1.8 % (float16) and 13 % (bfloat16) of the source in another cell than in
            float64 even with exact duals (TV 0.006 and 0.03 on a 10 x 10 grid), the order of the
            default tol; fit in float32 (``support.float()``) instead.
    """
    if isinstance(support, torch.Tensor) and support.is_floating_point() and torch.finfo(support.dtype).bits <= 16:
        raise ValueError(f"fit_discrete_potential needs float32 or float64 support, got {support.dtype}: half "
                         "precision scores put percents of the source in the wrong Laguerre cell (cell-mass "
                         "errors of the order of the default tol 0.01); fit support.float() instead")
    if threads is not None and (int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be a positive integer or None (automatic), got {threads!r}")
    start_potential = DiscreteBrenierPotential(support, weights, torch.zeros(support.shape[0], dtype=support.dtype,
                                                                            device=support.device))
    num, dim = start_potential.support.shape
    if method == "auto":
        method = "newton" if num <= _DENSE_LIMIT else "sgd"
    if method not in ("newton", "sgd"):
        raise ValueError(f"method must be 'auto', 'newton' or 'sgd', got {method!r}")
    if method == "newton" and num > _DENSE_LIMIT:
        raise ValueError(f"method 'newton' solves dense N x N systems, N <= {_DENSE_LIMIT}; got N = {num} "
                         "(use method='sgd')")
    if not (tol > 0 and max_time > 0 and max_iters >= 1):
        raise ValueError(f"need tol > 0, max_time > 0, max_iters >= 1; got {tol}, {max_time}, {max_iters}")
    if (batch_size is not None and batch_size < 2) or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"batch_size must be >= 2 and chunk_size >= 1 (or None), got {batch_size} and {chunk_size}")
    used = _auto_threads(torch.get_num_threads()) if threads is None else int(threads)
    with torch_threads(used):
        g, report = _solve(start_potential, source=source, tol=tol, max_time=max_time, max_iters=max_iters,
                           method=method, generator=_as_generator(generator), progress=progress, qmc=qmc,
                           batch_size=batch_size, chunk_size=chunk_size, threads=used)
    if not report.converged:
        warnings.warn(f"fit_discrete_potential stopped ({method}, {report.iterations} steps, {report.seconds:.1f} s) "
                      f"with TV {report.tv:.4g} > tol {tol}; the tolerance was not reached", RuntimeWarning,
                      stacklevel=2)
    potential = DiscreteBrenierPotential(support, weights, (g - g.mean()).to(support.dtype),
                                         block_size=start_potential.block_size)
    potential.fit_report = report
    return potential


def _solve(start: DiscreteBrenierPotential, *, source, tol, max_time, max_iters, method, generator, progress, qmc,
           batch_size, chunk_size, threads) -> tuple[torch.Tensor, FitReport]:
    """The solver loop of ``fit_discrete_potential`` (arguments checked there): float64 duals and the report."""
    y, w = start.support, start.weights.to(torch.float64)
    num, dim = y.shape
    chunk = chunk_size or max(256, min(2 ** 16, 2 ** 22 // num))
    batch = 2 ** math.ceil(math.log2(batch_size or max(2 ** 14, 16 * num)))
    draws = tuple(_stream(source, dim, generator, qmc, y.device, y.dtype) for _ in range(2))

    g = _gaussian_start(y.to(torch.float64), w)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=None, desc=f"semidiscrete {method}", unit="step")
    history, samples, clock = [], 0, time.perf_counter()
    eps, eps_start, converged = None, None, False
    damping, previous_tv, hard, before = 1.0, None, False, None
    for it in range(max_iters):
        if not hard and eps is not None and eps <= eps_start / 2 ** _ENTROPIC_STAGES:
            hard, eps = True, eps_start  # the hard stage's trust region starts at its widest
        # the hard stage's Laplacian is smoothed at a fixed eps: at the last entropic eps it is mostly noise
        passed = _batch_pass(y, g, draws, batch, chunk, eps_start * _HARD_SMOOTHING if hard else eps, soft=not hard)
        samples += batch
        tv, noise = passed.tv(w)
        seconds = time.perf_counter() - clock
        history.append((it, seconds, tv, noise, batch))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(tv=f"{tv:.4f}", noise=f"{noise:.4f}", batch=batch)
        if tv <= tol:
            converged = True
            break
        if seconds >= max_time or it == max_iters - 1:
            break
        if method == "newton":
            if eps is None:  # first pass: the entropic scale is the spread of each sample's top scores
                eps = eps_start = passed.gap_scale
                continue
            # Path following on the entropic dual: Newton steps limited to TRUST * eps per coordinate;
            # eps is halved after every unlimited step, down to eps_start / 2^STAGES; from there the
            # residual is the hard mass error, the entropic Laplacian at eps_start * HARD_SMOOTHING is
            # the curvature and eps is the trust radius.
            eps_floor = eps_start / 2 ** _ENTROPIC_STAGES
            if hard and before is not None and tv > before[1] + noise + before[2]:
                # the last hard step raised the TV beyond the noise of both measurements: undo it, halve the bound
                g, eps, before = before[0], max(eps / 2, eps_floor), None
                continue
            masses = passed.masses if hard else passed.soft_counts / passed.n
            if previous_tv is not None:  # Marquardt: trust the quadratic model more after a step that helped
                damping = max(_FLOOR, damping / 2) if tv < previous_tv else min(_MAX_DAMPING, 2 * damping)
            previous_tv = tv
            delta, unscaled = _newton_step(passed.hessian, masses, w, eps, damping, entropic=not hard,
                                           damping_eps=eps_start if hard else None)
            if not hard:
                eps = eps / 2 if unscaled else eps
            else:  # a trust region: the bound 2 eps halves after a step inside it,
                # doubles after one that needed scaling; a step that raised the TV is undone at the next pass
                before = (g, tv, noise)
                eps = max(eps / 2, eps_floor) if unscaled else min(2 * eps, eps_start)
        else:
            m = passed.masses
            delta = 0.5 * passed.gap_scale * (m - w) / (m + w).clamp_min(1e-300) / math.sqrt(1 + it / 10)
        g = g + delta - delta.mean()
        if tv < 4 * noise:  # the error is at the noise level: double the batch
            batch *= 2
    if bar is not None:
        bar.close()
    # the last pass scored the returned g (as rounded to the support's dtype) on fresh samples
    map_cost, lower, upper = _cost_bounds(passed, y.to(torch.float64), w, g.to(y.dtype).to(torch.float64))
    report = FitReport(method=method, tol=tol, tv=tv, tv_noise=noise, converged=converged, iterations=len(history),
                       seconds=seconds, samples=samples, map_cost=map_cost, cost_lower_bound=lower,
                       cost_upper_bound=upper, threads=threads, history=tuple(history))
    return g, report
