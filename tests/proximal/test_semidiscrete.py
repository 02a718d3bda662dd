"""Semi-discrete solver: exact grid duals recovered, cell masses on fresh samples, dual gradient, input checks."""

import math

import numpy as np
import ot
import pytest
import torch

from ot_cfm.data import toy_sampler
from proximal import semidiscrete, semidiscrete_report, semidiscrete_solver
from proximal.discrete import DiscreteBrenierPotential
from proximal.grid import GridPotential
from proximal.semidiscrete import FitReport, cell_masses, fit_discrete_potential
from proximal.semidiscrete_report import _cost_bounds
from proximal.semidiscrete_scoring import _batch_pass

# 4 x 3 tensor grid with unequal weights: its exact duals come from 1D Gaussian quantiles.
GRID = GridPotential([torch.tensor([-1.5, -0.2, 0.4, 1.7]), torch.tensor([-1.0, 0.1, 1.2])],
                     [torch.tensor([0.1, 0.4, 0.3, 0.2]), torch.tensor([0.5, 0.2, 0.3])])
EXACT = GRID.as_discrete()


def _centred(g):
    return g - g.mean()


def _mc_floor(n_support, n):
    """Expected TV of a multinomial estimate around the truth: ~ sqrt(2 / pi) / 2 * sqrt(N / n)."""
    return math.sqrt(2 / math.pi) / 2 * math.sqrt(n_support / n)


def test_exact_grid_duals_have_exact_cell_masses():
    # The measurement itself: the exact potential sits at the Monte Carlo noise floor.
    _, tv = cell_masses(EXACT, 2 ** 20, generator=1)
    assert tv < 3 * _mc_floor(12, 2 ** 20)


@pytest.mark.parametrize("method, tol", [("auto", 0.005), ("sgd", 0.02)])
def test_fit_recovers_grid_duals(method, tol):
    fitted = fit_discrete_potential(EXACT.support, EXACT.weights, tol=tol, max_time=60, method=method,
                                    generator=0, progress=False)
    report = fitted.fit_report
    assert isinstance(report, FitReport) and report.converged and report.tv <= tol
    assert report.method == ("newton" if method == "auto" else method)
    # Fresh i.i.d. samples (independent of the solver's QMC stream): TV within tol plus 3 noise floors.
    _, tv = cell_masses(fitted, 2 ** 20, generator=7)
    assert tv <= tol + 3 * _mc_floor(12, 2 ** 20)
    # Duals up to a constant. The facet weights of this grid (mass per unit of g) are >= ~0.1, so a
    # cell-mass error of at most 2 tol moves each g_j by at most ~20 tol.
    error = (_centred(fitted.dual_weights.double()) - _centred(EXACT.dual_weights.double())).abs().max()
    assert error < 20 * tol
    # The bounds of the OT cost on the last batch close as the cell masses converge.
    assert report.cost_lower_bound <= report.cost_upper_bound < report.cost_lower_bound + 10 * tol


def test_custom_source_and_float32():
    def source(n, generator):
        return torch.randn(n, 2, generator=generator)

    support = EXACT.support.float()
    fitted = fit_discrete_potential(support, EXACT.weights.float(), source=source, tol=0.02, max_time=60,
                                    generator=torch.Generator().manual_seed(3), progress=False)
    assert fitted.dual_weights.dtype == torch.float32
    assert fitted.fit_report.converged
    _, tv = cell_masses(fitted, 2 ** 18, source=source, generator=11)
    assert tv <= 0.02 + 3 * _mc_floor(12, 2 ** 18)


def test_dual_gradient_matches_finite_differences():
    # G(g) = E[max_j <x, y_j> - g_j] + sum_j w_j g_j on a fixed sample; dG/dg_j = w_j - mu0(C_j).
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    w = torch.softmax(torch.randn(7, generator=gen, dtype=torch.float64), 0)
    g = torch.randn(7, generator=gen, dtype=torch.float64)
    x = torch.randn(4096, 3, generator=gen, dtype=torch.float64)

    def sums(g):
        halves = iter(x.chunk(2))
        passed = _batch_pass(y, g, (lambda n: next(halves),) * 2, x.shape[0], x.shape[0] // 2, None)
        return passed.best_score / passed.n + float(w @ g), passed.masses

    _, masses = sums(g)
    step = 1e-7  # G is piecewise linear on a fixed sample: central differences are exact between kinks
    for j in range(7):
        e = torch.zeros(7, dtype=torch.float64)
        e[j] = step
        numeric = (sums(g + e)[0] - sums(g - e)[0]) / (2 * step)
        assert numeric == pytest.approx(float(w[j] - masses[j]), abs=1e-6)


def test_stops_with_warning_when_tolerance_not_reached():
    with pytest.warns(RuntimeWarning, match="tolerance was not reached"):
        fitted = fit_discrete_potential(EXACT.support, EXACT.weights, tol=1e-6, max_iters=2, progress=False)
    assert not fitted.fit_report.converged and fitted.fit_report.iterations == 2
    assert len(fitted.fit_report.history) == 2


def test_returns_discrete_potential_with_centred_duals():
    fitted = fit_discrete_potential(EXACT.support, None, tol=0.05, max_time=30, progress=False)
    assert isinstance(fitted, DiscreteBrenierPotential)
    assert abs(float(fitted.dual_weights.mean())) < 1e-9
    assert torch.equal(fitted.weights, torch.full((12,), 1 / 12, dtype=torch.float64))


@pytest.mark.parametrize("support, weights, kwargs, match", [
    (torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), None, {}, "NaN"),
    (torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 0.0]]), None, {}, "duplicate"),
    (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1.5, -0.5]), {}, "non-negative"),
    (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0.3, 0.3]), {}, "sum to 1"),
    (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), None, {"source": lambda n, gen: torch.randn(n, 3, generator=gen)},
     r"shape \(\d+, 2\)"),
    (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), None, {"method": "lbfgs"}, "method"),
    (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), None, {"tol": 0.0}, "tol"),
    (torch.tensor([[0.0, 1.0], [1.0, 0.0]]), None, {"batch_size": -1}, "batch_size"),
])
def test_bad_inputs_raise(support, weights, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_discrete_potential(support, weights, progress=False, **kwargs)


@pytest.mark.parametrize("n", [0, 1, 2.5])
def test_cell_masses_needs_an_integer_sample_count_of_at_least_two(n):
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        cell_masses(EXACT, n)


def test_sphere_samples_in_3d():
    # Uniform samples of S^2 in R^3 (a target on a manifold through the source's centre): every
    # Laguerre cell is an unbounded cone-like region; the solver must still reach the tolerance.
    y = torch.randn(200, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = y / y.norm(dim=1, keepdim=True)
    fitted = fit_discrete_potential(y, tol=0.02, max_time=60, generator=0, progress=False)
    assert fitted.fit_report.converged
    _, tv = cell_masses(fitted, 2 ** 20, generator=5)
    assert tv <= 0.02 + 3 * _mc_floor(200, 2 ** 20)


def test_hard_counts_and_hessian_match_a_direct_computation():
    # The pass ranks (top-k) only the rows that need soft weights; counts and the Laplacian must not depend on it.
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    g = 0.3 * torch.randn(30, generator=gen, dtype=torch.float64)
    x = torch.randn(1000, 2, generator=gen, dtype=torch.float64)
    eps = 0.2

    def pass_(soft, chunk):
        halves = iter(x.split(chunk))
        return _batch_pass(y, g, (lambda n: next(halves),) * 2, 1000, chunk, eps, hessian_samples=300, soft=soft)

    scores = x @ y.T - g
    expected_counts = torch.bincount(scores.argmax(1), minlength=30).double()
    top, idx = scores[:300].topk(8, dim=1)
    p = torch.zeros(300, 30, dtype=torch.float64).scatter(1, idx, torch.softmax(top / eps, 1))
    expected_hessian = (torch.diag(p.sum(0)) - p.T @ p) / (eps * 300)
    for soft in (True, False):
        passed = pass_(soft, 100)
        torch.testing.assert_close(passed.counts.sum(0), expected_counts, atol=0, rtol=0)
        torch.testing.assert_close(passed.hessian, expected_hessian, atol=1e-12, rtol=0)
        assert passed.best_score == pytest.approx(float(scores.max(1).values.sum()), rel=1e-12)
    full = torch.zeros(1000, 30, dtype=torch.float64).scatter(
        1, (ix := scores.topk(8, dim=1).indices), torch.softmax(scores.gather(1, ix) / eps, 1))
    torch.testing.assert_close(pass_(True, 100).soft_counts, full.sum(0), atol=1e-12, rtol=0)
    assert pass_(False, 100).soft_counts is None


def test_scaled_and_shifted_support_gives_the_same_cells():
    # With y = a z + b (a > 0 scalar) the Laguerre cells of z with duals g are those of y with a g:
    # both fits must converge and agree on the cell of almost every source point.
    g = torch.Generator().manual_seed(4)
    z = torch.randn(120, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.4], dtype=torch.float64)
    y = 3.0 * z + torch.tensor([5.0, -3.0], dtype=torch.float64)
    fit_z = fit_discrete_potential(z, tol=0.01, max_time=60, generator=0, progress=False)
    fit_y = fit_discrete_potential(y, tol=0.01, max_time=60, generator=0, progress=False)
    assert fit_z.fit_report.converged and fit_y.fit_report.converged
    x = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    agree = (fit_z.assign(x) == fit_y.assign(x)).double().mean()
    assert agree > 0.95


def _pass_on(x, y, g):
    """One hard pass over the fixed sample x (its two halves as the two draws)."""
    halves = iter(x.chunk(2))
    return _batch_pass(y, g, (lambda n: next(halves),) * 2, x.shape[0], x.shape[0] // 2, None)


@pytest.mark.parametrize("exact_repair", [True, False])
def test_cost_bounds_bracket_the_ot_cost_of_the_sample(exact_repair, monkeypatch):
    """For any duals g: dual value <= W(mu0_n, mu1) <= cost of the repaired coupling, W solved exactly by POT
    on the very sample (n = 400 points against 20 weighted targets). The map's own cost bounds nothing."""
    if not exact_repair:  # the proportional repair used when there are too many cell pairs for the exact one
        monkeypatch.setattr(semidiscrete_report, "_EXACT_REPAIR_PAIRS", 0)
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    w = torch.softmax(torch.randn(20, generator=gen, dtype=torch.float64), 0)
    x = torch.randn(400, 2, generator=gen, dtype=torch.float64)
    cost = (x[:, None] - y[None]).square().sum(-1) / 2
    exact = ot.emd2(np.full(400, 1 / 400), w.numpy(), cost.numpy(), numItermax=10 ** 7)
    for spread in (0.0, 0.3, 2.0):  # Voronoi cells, mildly and badly wrong duals
        g = spread * torch.randn(20, generator=gen, dtype=torch.float64)
        map_cost, lower, upper = _cost_bounds(_pass_on(x, y, g), y, w, g)
        assert lower <= exact + 1e-12 and exact <= upper + 1e-12, (lower, exact, upper)
        scores = x @ y.T - g
        assert map_cost == pytest.approx(float(cost.gather(1, scores.argmax(1)[:, None]).mean()), rel=1e-12)
        dual = float(x.square().sum(1).mean() / 2 + w @ y.square().sum(1) / 2 - scores.max(1).values.mean() - w @ g)
        assert lower == pytest.approx(dual, rel=1e-12)
    # with the optimal duals of this discrete problem (c-transform of POT's), the dual value is W itself
    _, log = ot.emd(np.full(400, 1 / 400), w.numpy(), cost.numpy(), numItermax=10 ** 7, log=True)
    g = y.square().sum(1) / 2 - torch.as_tensor(log["v"])  # u + v <= |x - y|^2 / 2  <=>  <x, y> - g <= |x|^2/2 - u
    _, lower, upper = _cost_bounds(_pass_on(x, y, g), y, w, g)
    assert lower == pytest.approx(exact, rel=1e-9) and upper >= exact - 1e-12


def test_fit_report_costs_bracket_and_name_the_map_cost():
    # 500 moons points at tol 0.02 reproduce the quickstart's inversion (the report's old "cost", the map's own,
    # 1.8609 below its "lower bound" 1.8656): the bounds must bracket, and the old name warns.
    data = toy_sampler("moons")(500, torch.Generator().manual_seed(0)).double()
    report = fit_discrete_potential(data, tol=0.02, max_time=60, generator=0, progress=False).fit_report
    assert report.converged
    assert report.cost_lower_bound <= report.cost_upper_bound
    with pytest.warns(DeprecationWarning, match="map_cost"):
        assert report.cost == report.map_cost


def test_half_precision_support_is_refused_with_advice():
    with pytest.raises(ValueError, match=r"float32 or float64 support, got torch.float16.*support.float\(\)"):
        fit_discrete_potential(EXACT.support.half(), progress=False)
    with pytest.raises(ValueError, match="bfloat16"):
        fit_discrete_potential(EXACT.support.bfloat16(), progress=False)
    # The potential itself takes float16 support with default weights: 1/1000 rounds to 0.0009995, the sum
    # to 0.99976, within float16's eps (~1e-3); float32 and float64 keep the 1e-5 tolerance.
    moons = toy_sampler("moons")(1000, torch.Generator().manual_seed(0))
    potential = DiscreteBrenierPotential(moons.half(), None, torch.zeros(1000))
    assert potential.weights.dtype == torch.float16
    with pytest.raises(ValueError, match="sum to 1"):
        DiscreteBrenierPotential(moons, torch.full((1000,), 0.9995e-3), torch.zeros(1000))


def test_threads_are_set_for_the_fit_and_restored(monkeypatch):
    seen = []

    def source(n, generator):
        seen.append(torch.get_num_threads())
        return torch.randn(n, 2, generator=generator)

    def failing(n, generator):
        raise RuntimeError("source failed")

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(semidiscrete.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
        for threads, load, expected in ((1, 0.0, 1), (2, 9.0, 2), (None, 0.0, 2), (None, 1.5, 1)):
            monkeypatch.setattr(semidiscrete.os, "getloadavg", lambda: (load, load, load))
            seen.clear()
            fitted = fit_discrete_potential(EXACT.support, EXACT.weights, source=source, tol=0.05, max_time=30,
                                            threads=threads, progress=False)
            assert set(seen) == {expected} and fitted.fit_report.threads == expected
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="source failed"):
            fit_discrete_potential(EXACT.support, source=failing, threads=1, progress=False)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="threads"):
            fit_discrete_potential(EXACT.support, threads=0, progress=False)
    finally:
        torch.set_num_threads(previous)


def test_automatic_threads_take_only_idle_cores(monkeypatch):
    monkeypatch.setattr(semidiscrete.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    for load, current, expected in [(0.2, 4, 3), (0.2, 2, 2), (0.2, 1, 1),  # never above torch's setting
                                    (1.0, 4, 3), (2.5, 4, 1), (3.9, 4, 1), (7.0, 4, 1)]:  # busy: one thread
        monkeypatch.setattr(semidiscrete.os, "getloadavg", lambda: (load, load, load))
        assert semidiscrete._auto_threads(current) == expected, (load, current)


def test_a_pass_does_not_depend_on_the_chunk_size():
    """The gap scale (which sets the first entropic scale eps) is the median top-k gap of the first 2^12 samples of
    the pass, whatever the chunk size: it used to be the median over the first chunk only, so the same seed
    started from another eps with another chunk size (the digits fit converged with one and stalled with another)."""
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    g = 0.2 * torch.randn(40, generator=gen, dtype=torch.float64)
    x = torch.randn(2 * 6000, 3, generator=gen, dtype=torch.float64)

    def pass_(chunk):
        halves = [iter(half.split(chunk)) for half in x.chunk(2)]
        return _batch_pass(y, g, (lambda n: next(halves[0]), lambda n: next(halves[1])), x.shape[0], chunk, 0.1,
                           hessian_samples=5000)

    scores = x[:6000] @ y.T - g
    top = scores.topk(8, dim=1).values
    expected = float((top[:4096, 0] - top[:4096, -1]).median())
    passes = [pass_(chunk) for chunk in (100, 1000, 6000)]
    for passed in passes:
        assert passed.gap_scale == pytest.approx(expected, rel=1e-12)
        torch.testing.assert_close(passed.counts, passes[0].counts, atol=0, rtol=0)
        torch.testing.assert_close(passed.hessian, passes[0].hessian, atol=1e-12, rtol=0)
    assert float((top[:100, 0] - top[:100, -1]).median()) != pytest.approx(expected, rel=1e-3)  # the old scale


# A 3 x 3 x 3 tensor grid with unequal weights in 3D: 27 cells whose exact duals come from 1D Gaussian quantiles.
GRID3 = GridPotential([torch.tensor([-1.2, 0.1, 0.9]), torch.tensor([-0.5, 0.3, 1.4]), torch.tensor([-2.0, -1.0, 0.5])],
                      [torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.3, 0.3, 0.4]), torch.tensor([0.1, 0.6, 0.3])])
EXACT3 = GRID3.as_discrete()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [97, 1000, None])
def test_fit_recovers_exact_grid_duals_for_every_seed_and_chunk_size(seed, chunk_size):
    fitted = fit_discrete_potential(EXACT3.support, EXACT3.weights, tol=0.005, max_time=60, generator=seed,
                                    chunk_size=chunk_size, progress=False)
    assert fitted.fit_report.converged
    _, tv = cell_masses(fitted, 2 ** 20, generator=100 + seed)
    assert tv <= 0.005 + 3 * _mc_floor(27, 2 ** 20)
    error = (_centred(fitted.dual_weights.double()) - _centred(EXACT3.dual_weights.double())).abs().max()
    assert error < 20 * 0.005


def test_gaussian_start_is_the_c_transform_of_the_gaussian_map():
    """The starting cells send x to the support point nearest to T(x) = m + S^{1/2} x in the metric S^{-1/2}: the
    Laguerre cells of the Gaussian Brenier map onto the support's mean and covariance (here of rank 2 in R^3)."""
    gen = torch.Generator().manual_seed(0)
    mixing = torch.tensor([[3.0, 0.0], [1.0, 0.2], [0.0, 0.5]], dtype=torch.float64)
    y = torch.randn(50, 2, generator=gen, dtype=torch.float64) @ mixing.T + torch.tensor([1.0, -2.0, 0.5],
                                                                                          dtype=torch.float64)
    w = torch.softmax(torch.randn(50, generator=gen, dtype=torch.float64), 0)
    g = semidiscrete_solver._gaussian_start(y, w)
    mean = w @ y
    values, vectors = torch.linalg.eigh((y - mean).T @ ((y - mean) * w[:, None]))
    values = values.clamp_min(0)
    root, inverse_root = (vectors * values.sqrt()) @ vectors.T, (vectors[:, 1:] / values[1:].sqrt()) @ vectors[:, 1:].T
    x = torch.randn(2000, 3, generator=gen, dtype=torch.float64)
    moved = mean + x @ root
    diff = moved[:, None, :] - y[None]
    nearest = torch.einsum("bnd,de,bne->bn", diff, inverse_root, diff).argmin(1)
    assert torch.equal(DiscreteBrenierPotential(y, w, g).assign(x), nearest)
    assert abs(float(g.mean())) < 1e-12


def test_gaussian_start_fills_the_cells_of_an_anisotropic_support():
    """Against the isotropic Voronoi start (the old one), the Gaussian start's cells hold their masses far better."""
    y = torch.randn(300, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * torch.tensor(
        [5.0, 0.1], dtype=torch.float64)
    w = torch.full((300,), 1 / 300, dtype=torch.float64)
    centred = y - y.mean(0)
    isotropic = centred.square().sum(1) / (2 * float(centred.square().mean()) ** 0.5)
    _, tv_gaussian = cell_masses(DiscreteBrenierPotential(y, w, semidiscrete_solver._gaussian_start(y, w)), 2 ** 16, generator=0)
    _, tv_isotropic = cell_masses(DiscreteBrenierPotential(y, w, isotropic - isotropic.mean()), 2 ** 16, generator=0)
    assert tv_gaussian < 0.25 < 0.6 < tv_isotropic, (tv_gaussian, tv_isotropic)  # measured: 0.22 and 0.73


def test_an_empty_cell_no_longer_freezes_the_newton_step():
    """The digits stall: an empty cell (no curvature, soft mass 0) asked for a damping-limited move of
    (w_j - m_j) / (0.05 w_j / eps) = 20 eps; the whole step was scaled to 2 eps by it, so the other cells moved
    a tenth of their Newton step and eps never halved. Now the empty cell takes Sinkhorn's move, clamped to
    -2 eps, and the others their full Newton step given it."""
    eps, damping = 0.5, semidiscrete_solver._FLOOR
    w = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1], dtype=torch.float64)
    edges = torch.tensor([[0, 1, 0.4], [1, 2, 0.3], [2, 3, 0.2], [0, 3, 0.1]], dtype=torch.float64)
    hessian = torch.zeros(5, 5, dtype=torch.float64)
    for i, j, weight in edges.tolist():  # a graph Laplacian on cells 0..3; cell 4 has no neighbour
        i, j = int(i), int(j)
        hessian[i, j] = hessian[j, i] = -weight / eps
        hessian[i, i] += weight / eps
        hessian[j, j] += weight / eps
    masses = torch.tensor([0.33, 0.31, 0.24, 0.12, 0.0], dtype=torch.float64)  # cell 4 empty
    residual = masses - w
    # the old rule: one damped Newton solve for all cells, scaled by its largest move
    old = torch.linalg.solve(hessian + torch.diag(damping * w / eps), residual)
    assert float(old[4]) == pytest.approx(-20 * eps, rel=1e-12)  # the empty cell: 20 eps, 10x the bound 2 eps
    assert float((old - old.mean()).abs().max()) > 4 * semidiscrete_solver._TRUST * eps
    delta, unscaled = semidiscrete_solver._newton_step(hessian, masses, w, eps, damping, entropic=True)
    assert unscaled
    bulk = torch.linalg.solve(hessian[:4, :4] + torch.diag(damping * w[:4] / eps), residual[:4])
    expected = torch.cat([bulk, torch.tensor([-semidiscrete_solver._TRUST * eps], dtype=torch.float64)])
    torch.testing.assert_close(delta, expected - expected.mean(), rtol=1e-12, atol=1e-12)
    # a cell at 1/e of its weight moves eps log(1/e) = -eps, the Sinkhorn update
    masses[4] = 0.1 / math.e
    delta, _ = semidiscrete_solver._newton_step(hessian, masses, w, eps, damping, entropic=True)
    expected = torch.cat([bulk, torch.tensor([-eps], dtype=torch.float64)])
    torch.testing.assert_close(delta, expected - expected.mean(), rtol=1e-12, atol=1e-12)
    # the hard stage keeps every cell in the damped Newton solve, scaled to the bound
    hard, unscaled = semidiscrete_solver._newton_step(hessian, masses, w, eps, damping, entropic=False)
    assert not unscaled and float(hard.abs().max()) == pytest.approx(semidiscrete_solver._TRUST * eps)


def test_hard_stage_smooths_its_laplacian_at_a_fixed_eps_and_damps_on_the_first_eps(monkeypatch):
    """The hard stage's Laplacian is smoothed at eps_0 * HARD_SMOOTHING (at the last entropic eps it was
    mostly sampling noise), its trust radius starts at eps_0 and its damping is mu w / eps_0: on 1000 moons
    points the old rule (curvature, bound and damping all at eps_0 / 1024) took 9 passes of 2^21 samples from
    TV 0.0057 to 0.0049, one step of the new one goes to about 0.003."""
    seen = []
    original = semidiscrete_solver._batch_pass

    def recording(y, g, draws, n, chunk, eps=None, **kwargs):
        seen.append((eps, kwargs.get("soft", True)))
        return original(y, g, draws, n, chunk, eps, **kwargs)

    monkeypatch.setattr(semidiscrete_solver, "_batch_pass", recording)
    fitted = fit_discrete_potential(EXACT3.support, EXACT3.weights, tol=0.002, max_time=60, generator=0,
                                    progress=False)
    assert fitted.fit_report.converged and fitted.fit_report.tv <= 0.002
    eps_start = seen[1][0]  # the first eps, set after the first pass
    hard = [eps for eps, soft in seen if not soft]
    assert hard and all(eps == pytest.approx(eps_start * semidiscrete_solver._HARD_SMOOTHING) for eps in hard)
    # the damping scale: mu w / damping_eps on the diagonal of the hard solve
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    hessian = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    masses = torch.tensor([0.6, 0.4], dtype=torch.float64)
    delta, unscaled = semidiscrete_solver._newton_step(hessian, masses, w, 1.0, 0.05, entropic=False, damping_eps=4.0)
    expected = torch.linalg.solve(hessian + torch.diag(0.05 * w / 4.0), masses - w)
    assert unscaled
    torch.testing.assert_close(delta, expected - expected.mean(), rtol=1e-12, atol=1e-12)
