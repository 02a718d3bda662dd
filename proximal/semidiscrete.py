"""Semi-discrete OT solver: dual weights ``g`` of ``phi(x) = max_j <x, y_j> - g_j``.

Target ``mu1 = sum_j w_j delta_{y_j}``, source ``mu0`` (default N(0, I_d)). The dual

    G(g) = E_{x~mu0}[max_j <x, y_j> - g_j] + sum_j w_j g_j

is convex, with gradient ``dG/dg_j = w_j - mu0(C_j)`` (Laguerre cells ``C_j``) and Hessian the
graph Laplacian of the facet weights ``H_jk = int_{C_j cap C_k} rho / |y_j - y_k|``; its minimiser
gives ``mu0(C_j) = w_j`` (Kitagawa, Merigot & Thibert, JEMS 2019). Every quantity is a Monte
Carlo (or randomised quasi-Monte Carlo) estimate on fresh source samples, drawn in chunks.

Methods (``proximal.semidiscrete_solver``): ``"newton"`` (default for N <= 4096), path following on the
entropic dual to the hard one with damped Newton steps; ``"sgd"``, stochastic gradient steps.

Quality: ``TV = 1/2 sum_j |mu0(C_j) - w_j|`` on each batch, which is fresh for the current
iterate (it was not used to compute it); the batch is drawn as two independent halves and
``noise = 1/4 sum_j |m^A_j - m^B_j|`` estimates the sampling floor of that TV estimate. The last
batch also brackets the OT cost of its own samples: the dual value at g below, the cost of a
repaired coupling above (``FitReport``).
"""

from __future__ import annotations

import os
import warnings

import torch

from ot_cfm.utils.parallelism import available_cores, torch_threads
from proximal.discrete import DiscreteBrenierPotential
from proximal.semidiscrete_report import FitReport
from proximal.semidiscrete_scoring import Source, _batch_pass, _stream
from proximal.semidiscrete_solver import _DENSE_LIMIT, _solve

__all__ = ["FitReport", "fit_discrete_potential", "cell_masses"]


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
        weights: (N,) non-negative masses summing to 1 (default uniform). Points of zero mass are left out of
            the fit (it runs on the others as if they were absent; N below counts the others), then get duals
            that put their Laguerre cells in half-spaces at distance 2 r from the origin, r the largest ``|x|``
            of the fit's samples (``_empty_cell_duals``): none of the fit's samples lies in them, so the report
            is that of the whole support, and each such cell holds at most the source's mass beyond 2 r in one
            direction (no finite dual empties the cell of a point outside the convex hull of the others): for
            N(0, I) ``Phi(-2 r)``, about 1e-18 in d = 2 with the least first batch (2^14 samples, r about 4.4).
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
        A ``DiscreteBrenierPotential`` with the duals centred to mean zero on the points of positive mass and the
        ``FitReport``
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
    whole = DiscreteBrenierPotential(support, weights, torch.zeros(support.shape[0], dtype=support.dtype,
                                                                   device=support.device))
    positive = whole.weights > 0
    start_potential = DiscreteBrenierPotential(whole.support[positive], whole.weights[positive],
                                               whole.dual_weights[positive], block_size=whole.block_size)
    num = start_potential.support.shape[0]
    if method == "auto":
        method = "newton" if num <= _DENSE_LIMIT else "sgd"
    if method not in ("newton", "sgd"):
        raise ValueError(f"method must be 'auto', 'newton' or 'sgd', got {method!r}")
    if method == "newton" and num > _DENSE_LIMIT:
        raise ValueError(f"method 'newton' solves dense N x N systems, N <= {_DENSE_LIMIT}; got N = {num} points of "
                         "positive mass (use method='sgd')")
    if not (tol > 0 and max_time > 0 and max_iters >= 1):
        raise ValueError(f"need tol > 0, max_time > 0, max_iters >= 1; got {tol}, {max_time}, {max_iters}")
    if (batch_size is not None and batch_size < 2) or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"batch_size must be >= 2 and chunk_size >= 1 (or None), got {batch_size} and {chunk_size}")
    used = _auto_threads(torch.get_num_threads()) if threads is None else int(threads)
    with torch_threads(used):
        g, report, radius = _solve(start_potential, source=source, tol=tol, max_time=max_time, max_iters=max_iters,
                                   method=method, generator=_as_generator(generator), progress=progress, qmc=qmc,
                                   batch_size=batch_size, chunk_size=chunk_size, threads=used)
    if not report.converged:
        warnings.warn(f"fit_discrete_potential stopped ({method}, {report.iterations} steps, {report.seconds:.1f} s) "
                      f"with TV {report.tv:.4g} > tol {tol}; the tolerance was not reached", RuntimeWarning,
                      stacklevel=2)
    g = _empty_cell_duals(whole.support, positive, g, radius, whole.block_size)
    potential = DiscreteBrenierPotential(support, weights, (g - g[positive].mean()).to(support.dtype),
                                         block_size=whole.block_size)
    potential.fit_report = report
    return potential


def _empty_cell_duals(y: torch.Tensor, positive: torch.Tensor, g: torch.Tensor, radius: float,
                      block_size: int) -> torch.Tensor:
    """Duals (N,) float64 of support y (N, d): ``g`` (P,) on the P points where ``positive`` (N,) holds and, on
    each other point y_j, ``g_j = min_k g_k + 2 r |y_j - y_k|`` over the positive points k (r = ``radius``). For
    the minimising k, ``<x, y_j> - g_j <= <x, y_k> - g_k - (2 r - |x|) |y_j - y_k|``: the Laguerre cell of y_j
    lies in the half-space ``<x, y_j - y_k> >= 2 r |y_j - y_k|``, beyond every |x| < 2 r. Distances in blocks
    of at most ``block_size`` pairs."""
    y = y.to(torch.float64)
    duals = torch.empty(y.shape[0], dtype=torch.float64, device=y.device)
    duals[positive] = g
    held, emptied = y[positive], (~positive).nonzero().flatten()
    rows = max(1, block_size // held.shape[0])
    for start in range(0, emptied.numel(), rows):
        j = emptied[start:start + rows]
        distances = torch.cdist(y[j], held, compute_mode="donot_use_mm_for_euclid_dist")
        duals[j] = (g + 2 * radius * distances).amin(1)
    return duals
