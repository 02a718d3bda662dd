import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ot_cfm.metrics import normalized_path_energy, path_energy, wasserstein2


def test_w2_of_a_translation_is_the_shift_length():
    a = torch.randn(200, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)
    assert wasserstein2(a, a + shift) == pytest.approx(5.0, rel=1e-9)


def test_w2_equals_assignment_optimum_for_equal_sizes():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(150, 4, generator=g), torch.randn(150, 4, generator=g) + 1
    cost = torch.cdist(a.double(), b.double()).pow(2).numpy()
    r, c = linear_sum_assignment(cost)
    assert wasserstein2(a, b) == pytest.approx(np.sqrt(cost[r, c].mean()), rel=1e-9)


def test_w2_unequal_sizes_and_images():
    a = torch.zeros(3, 1, 2, 2)
    b = torch.ones(5, 1, 2, 2)
    assert wasserstein2(a, b) == pytest.approx(2.0)


def test_path_energy_of_straight_paths_is_squared_length_and_npe_zero():
    x0, x1 = torch.randn(50, 2, dtype=torch.float64), torch.randn(50, 2, dtype=torch.float64)
    times = torch.linspace(0, 1, 6, dtype=torch.float64)
    traj = (1 - times)[:, None, None] * x0 + times[:, None, None] * x1
    energy = (x1 - x0).pow(2).sum(1).mean().item()
    assert path_energy(traj, times) == pytest.approx(energy, rel=1e-12)
    assert normalized_path_energy(traj, times, energy) == pytest.approx(0.0, abs=1e-12)
    assert normalized_path_energy(traj, times, energy / 2) == pytest.approx(1.0)


def test_metric_inputs_are_validated():
    with pytest.raises(ValueError, match="NaN"):
        wasserstein2(torch.tensor([[float("nan")]]), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="per-sample shape"):
        wasserstein2(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="increasing"):
        path_energy(torch.zeros(3, 2, 2), torch.tensor([0.0, 0.5, 0.5]))
