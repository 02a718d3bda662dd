"""The solver loop of ``fit_discrete_potential`` (``proximal.semidiscrete``): duals ``g`` of
``phi(x) = max_j <x, y_j> - g_j`` from scoring passes (``proximal.semidiscrete_scoring``) on fresh samples.

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
"""

from __future__ import annotations

import math
import time

import torch

from proximal.discrete import DiscreteBrenierPotential
from proximal.semidiscrete_report import FitReport, _cost_bounds
from proximal.semidiscrete_scoring import _batch_pass, _stream

_ENTROPIC_STAGES = 8  # eps halvings before the hard stage
_TRUST = 2.0  # largest Newton move of a dual weight, in units of eps
_HARD_SMOOTHING = 2.0 ** -6  # eps of the hard stage's Laplacian, in units of the first eps
_FLOOR = 0.05  # least Levenberg-Marquardt damping mu, in units of w_j / eps (a cell of mass w_j softened by eps)
_MAX_DAMPING = 10.0  # largest mu
_DENSE_LIMIT = 4096  # largest N for the dense Newton systems


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


def _solve(start: DiscreteBrenierPotential, *, source, tol, max_time, max_iters, method, generator, progress, qmc,
           batch_size, chunk_size, threads) -> tuple[torch.Tensor, FitReport, float]:
    """The solver loop of ``fit_discrete_potential`` (arguments checked there): float64 duals (N,), the report
    and the largest |x| of the samples drawn."""
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
    history, samples, radius, clock = [], 0, 0.0, time.perf_counter()
    eps, eps_start, converged = None, None, False
    damping, previous_tv, hard, before = 1.0, None, False, None
    for it in range(max_iters):
        if not hard and eps is not None and eps <= eps_start / 2 ** _ENTROPIC_STAGES:
            hard, eps = True, eps_start  # the hard stage's trust region starts at its widest
        # the hard stage's Laplacian is smoothed at a fixed eps: at the last entropic eps it is mostly noise
        passed = _batch_pass(y, g, draws, batch, chunk, eps_start * _HARD_SMOOTHING if hard else eps, soft=not hard)
        samples, radius = samples + batch, max(radius, passed.radius)
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
    return g, report, radius
