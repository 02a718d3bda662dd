"""Semi-discrete solver: exact grid duals recovered, cell masses on fresh samples, dual gradient, input checks."""

import math

import pytest
import torch

from proximal.discrete import DiscreteBrenierPotential
from proximal.grid import GridPotential
from proximal.semidiscrete import FitReport, _batch_pass, cell_masses, fit_discrete_potential

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
    # Transport cost of the fitted map against the dual bound: the gap is sum_j (m_j - w_j)(|y_j|^2/2 - g_j).
    assert abs(report.cost - report.cost_lower_bound) < 10 * tol * report.cost


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
])
def test_bad_inputs_raise(support, weights, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_discrete_potential(support, weights, progress=False, **kwargs)
