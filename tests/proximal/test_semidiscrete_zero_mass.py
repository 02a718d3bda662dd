"""Semi-discrete fit of targets with points of zero mass: the fit of the same target without them, and empty cells."""

import pytest
import torch

from ot_cfm.data import toy_sampler
from proximal.semidiscrete import cell_masses, fit_discrete_potential

MOONS = toy_sampler("moons")(12, torch.Generator().manual_seed(0)).double()
WEIGHTS = torch.linspace(1.0, 2.0, 12, dtype=torch.float64) / torch.linspace(1.0, 2.0, 12).sum()
# zero-mass points inside the convex hull of the others (their centre), far outside it, next to one of them
ZERO = torch.tensor([[0.5, 0.25], [10.0, 10.0], [0.0, 0.0]], dtype=torch.float64)
ZERO[2] = MOONS[3] + 1e-3
AT = [0, 7, 14]  # where they sit in the support


def _with_zero_mass_points():
    positive = torch.ones(15, dtype=torch.bool)
    positive[AT] = False
    support = torch.empty(15, 2, dtype=torch.float64)
    support[positive], support[~positive] = MOONS, ZERO
    weights = torch.zeros(15, dtype=torch.float64)
    weights[positive] = WEIGHTS
    return support, weights, positive


@pytest.mark.parametrize("method", ["newton", "sgd"])
def test_zero_mass_points_fit_as_if_absent_and_their_cells_stay_empty(method):
    support, weights, positive = _with_zero_mass_points()
    fit = dict(tol=0.02, max_time=60, method=method, generator=0, progress=False)
    whole = fit_discrete_potential(support, weights, **fit)  # newton: a singular Newton system before
    alone = fit_discrete_potential(MOONS, WEIGHTS, **fit)
    report, reference = whole.fit_report, alone.fit_report
    assert report.converged and report.tv <= 0.02
    # the same fit: the same steps, samples, TV and cost bounds, and the same duals on the points of positive mass
    for field in ("tv", "tv_noise", "iterations", "samples", "map_cost", "cost_lower_bound", "cost_upper_bound"):
        assert getattr(report, field) == getattr(reference, field), field
    assert [row[2:] for row in report.history] == [row[2:] for row in reference.history]
    assert torch.equal(whole.dual_weights[positive], alone.dual_weights)
    # on fresh samples the zero-mass cells are empty and the others hold what they hold without those points
    masses, tv = cell_masses(whole, 2 ** 18, generator=5)
    masses_alone, tv_alone = cell_masses(alone, 2 ** 18, generator=5)
    assert torch.equal(masses[~positive], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(masses[positive], masses_alone) and tv == tv_alone


def test_one_point_of_positive_mass_takes_the_whole_source_at_its_exact_cost():
    support = torch.tensor([[3.0, 0.0], [1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    weights = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    fitted = fit_discrete_potential(support, weights, generator=0, progress=False)
    report = fitted.fit_report
    assert report.converged and report.tv == 0 and report.iterations == 1
    masses, _ = cell_masses(fitted, 2 ** 16, generator=1)
    assert masses.tolist() == [0.0, 1.0, 0.0]
    # one coupling: the dual value, the map's cost and the repaired coupling's cost are all mean |x - y_1|^2 / 2,
    # whose expectation under N(0, I_2) is (2 + |y_1|^2) / 2 = 3.5
    assert report.cost_lower_bound == pytest.approx(report.map_cost, abs=1e-9)
    assert report.cost_upper_bound == pytest.approx(report.map_cost, abs=1e-9)
    assert report.map_cost == pytest.approx(3.5, abs=0.05)
