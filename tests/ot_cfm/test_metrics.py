import math

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torchcfm.optimal_transport import wasserstein as torchcfm_wasserstein

from ot_cfm.evaluation.metrics import normalized_path_energy, path_energy, wasserstein, wasserstein2


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


@pytest.mark.parametrize("scale, offset", [(1e200, 0.0), (1e-150, 0.0), (1e-6, 0.0), (1.0, 1e6)], ids=str)
def test_w2_at_any_scale_and_offset_is_the_scaled_unit_value(scale, offset):
    """W2(offset + s a, offset + s b) = s W2(a, b). Before centring and scaling, 1e200 overflowed the
    squared costs (and the error said "raise max_iterations"), 1e-6 came out 0.3 % too large (POT's
    absolute tolerances; 1.9x at 1e-150 on other points), and the offset cancelled digits of the cost."""
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(20, 2, generator=g, dtype=torch.float64), torch.randn(30, 2, generator=g, dtype=torch.float64)
    expected = scale * wasserstein2(a, b)
    assert wasserstein2(offset + scale * a, offset + scale * b) == pytest.approx(expected, rel=1e-9)


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


def test_w2_unequal_random_sets_matches_pot_in_float64():
    """37 vs 53 random points: W2 is sqrt of POT's exact emd2 on float64 squared costs. The same
    solver on the same float64 costs agrees to rounding (1e-12); float32 inputs must be promoted
    before the costs are formed, which float32 costs (error ~1e-7 relative) would miss."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(37, 3, generator=g, dtype=torch.float64)
    b = 0.8 * torch.randn(53, 3, generator=g, dtype=torch.float64) + torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)

    def reference(x, y):
        x, y = x.double().numpy(), y.double().numpy()
        return np.sqrt(ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), ot.dist(x, y), numItermax=10**9))

    expected = reference(a, b)
    assert wasserstein2(a, b) == pytest.approx(expected, rel=1e-12)
    assert wasserstein2(b, a) == pytest.approx(expected, rel=1e-12)
    a32, b32 = a.float(), b.float()
    assert wasserstein2(a32, b32) == pytest.approx(reference(a32, b32), rel=1e-12)


def test_w2_of_two_single_points_is_their_distance():
    """W2 itself, not W2^2: two Dirac masses 3 apart are at W2 = 3 (9 would be the square)."""
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, -1.0]])
    assert wasserstein2(a, b) == pytest.approx(3.0, rel=1e-12)


def test_w2_raises_when_the_solver_stops_early():
    """An iteration cap below what the simplex needs must raise, not return a suboptimal value."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(20, 2, generator=g), torch.randn(30, 2, generator=g)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="max_iterations"):
        wasserstein2(a, b, max_iterations=1)


# x(t) = t^2 c on times 0, 0.1, 0.5, 1: x_{k+1} - x_k = (t_{k+1}^2 - t_k^2) c, so each term
# |x_{k+1} - x_k|^2 / (t_{k+1} - t_k) is (t_{k+1} + t_k)^2 (t_{k+1} - t_k) |c|^2:
# 0.1^2 * 0.1 + 0.6^2 * 0.4 + 1.5^2 * 0.5 = 0.001 + 0.144 + 1.125 = 1.27 (the integral would be 4/3).
# Ignoring the times (even steps of 1/3) gives 3 * (0.01^2 + 0.24^2 + 0.75^2) = 1.8606; (sum |dx|)^2 gives 1.
UNEVEN_TIMES = [0.0, 0.1, 0.5, 1.0]
UNEVEN_FACTOR = 1.27


def quadratic_paths(seed=4):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)  # batch of 5, per-sample shape (2, 3)
    times = torch.tensor(UNEVEN_TIMES, dtype=torch.float64)
    return (times**2)[:, None, None, None] * c, times, c.flatten(1).pow(2).sum(1)  # (K, B, 2, 3), (K,), |c|^2 (B,)


def test_path_energy_on_an_uneven_grid_matches_the_hand_discretisation():
    """Curved paths on an uneven grid: the value is mean over the batch of sum over steps of the
    squared step (summed over all coordinates) over dt, i.e. 1.27 mean |c|^2; exact up to rounding."""
    traj, times, c_sq = quadratic_paths()
    expected = UNEVEN_FACTOR * c_sq.mean().item()
    assert path_energy(traj, times) == pytest.approx(expected, rel=1e-12)
    # per-sample check: one path alone gives its own 1.27 |c_b|^2 (mean over the batch, not the sum)
    for b in range(traj.shape[1]):
        assert path_energy(traj[:, b : b + 1], times) == pytest.approx(UNEVEN_FACTOR * c_sq[b].item(), rel=1e-12)
    # float32 times are cast to the trajectory's dtype; only their rounding (~1e-7) differs
    assert path_energy(traj, times.float()) == pytest.approx(expected, rel=1e-6)


def test_normalized_path_energy_on_curved_paths():
    """NPE = |E - W2^2| / W2^2 with E = 1.27 mean |c|^2: against W2^2 = mean |c|^2 (the straight
    path's energy) it is 0.27, and against a W2^2 above E it is still positive (absolute value)."""
    traj, times, c_sq = quadratic_paths()
    w2_squared = c_sq.mean().item()
    assert normalized_path_energy(traj, times, w2_squared) == pytest.approx(UNEVEN_FACTOR - 1, rel=1e-12)
    assert normalized_path_energy(traj, times, 2 * w2_squared) == pytest.approx(1 - UNEVEN_FACTOR / 2, rel=1e-12)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            normalized_path_energy(traj, times, bad)


def test_path_energy_rejects_times_of_the_wrong_shape():
    """times must have one entry per trajectory frame."""
    traj, times, _ = quadratic_paths()
    with pytest.raises(ValueError, match="times must have shape"):
        path_energy(traj, times[:-1])


# ---------------------------------------------------------------- wasserstein(power=1 or 2, exact or sinkhorn)


def two_clouds(seed=5, n0=40, n1=55, d=3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n0, d, generator=g, dtype=torch.float64)
    b = 0.7 * torch.randn(n1, d, generator=g, dtype=torch.float64) + torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    return a, b


def pot_value(a, b, power, reg=None):
    """POT on the raw costs |a - b|^power: emd2 (exact) or sinkhorn2 (entropic, absolute reg), then the 1/power root."""
    x, y = a.double().numpy(), b.double().numpy()
    cost = ot.dist(x, y, metric="euclidean") if power == 1 else ot.dist(x, y)
    wa, wb = ot.unif(len(x)), ot.unif(len(y))
    value = ot.emd2(wa, wb, cost, numItermax=10**9) if reg is None else ot.sinkhorn2(wa, wb, cost, reg, numItermax=10**7)
    return float(value) ** (1 / power)


@pytest.mark.parametrize("power", [1, 2])
def test_wasserstein_exact_equals_pot_and_torchcfm(power):
    """W_p itself (not its p-th power) on unequal random sets: the same LP as POT's emd2 on the raw costs and as
    torchcfm's ``wasserstein`` (which calls it), to rounding; power 2 is ``wasserstein2``."""
    a, b = two_clouds()
    expected = pot_value(a, b, power)
    assert wasserstein(a, b, power=power) == pytest.approx(expected, rel=1e-10)
    assert wasserstein(a, b, "exact", power=power) == pytest.approx(torchcfm_wasserstein(a, b, power=power), rel=1e-10)
    if power == 2:
        assert wasserstein(a, b) == pytest.approx(wasserstein2(a, b), rel=1e-12)


def test_wasserstein_one_and_two_on_dirac_masses():
    """Two Dirac masses 3 apart: W1 = W2 = 3. Half the mass moved by 2, half by 0: W1 = 1, W2 = sqrt(2),
    which tells W_p from W_p^p and the powers apart (W1 <= W2 always, strictly here)."""
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, -1.0]])
    assert wasserstein(a, b, power=1) == pytest.approx(3.0, rel=1e-12)
    assert wasserstein(a, b, power=2) == pytest.approx(3.0, rel=1e-12)
    a = torch.tensor([[0.0], [10.0]], dtype=torch.float64)
    b = torch.tensor([[2.0], [10.0]], dtype=torch.float64)
    assert wasserstein(a, b, power=1) == pytest.approx(1.0, rel=1e-12)
    assert wasserstein(a, b, power=2) == pytest.approx(math.sqrt(2.0), rel=1e-12)


@pytest.mark.parametrize("power, reg", [(1, 0.1), (2, 0.1), (2, 1.0)])
def test_wasserstein_sinkhorn_equals_pot_and_torchcfm(power, reg):
    """The entropic plan's transport cost with an absolute reg, as torchcfm's ``wasserstein(method="sinkhorn")``
    and POT's sinkhorn2 on the raw costs (both converge to the same plan to POT's tolerance 1e-9); it lies
    above the exact value, by more for a larger reg."""
    a, b = two_clouds(seed=7, n0=20, n1=25)
    value = wasserstein(a, b, "sinkhorn", reg=reg, power=power)
    assert value == pytest.approx(pot_value(a, b, power, reg=reg), rel=1e-6)
    assert value == pytest.approx(torchcfm_wasserstein(a, b, "sinkhorn", reg=reg, power=power), rel=1e-6)
    assert value > wasserstein(a, b, power=power)


def test_wasserstein_sinkhorn_is_scale_equivariant_and_tends_to_the_exact_value():
    """W_p(s a, s b) with reg s^p reg is s W_p(a, b) (the plan depends on C / reg only; the costs are formed
    on centred, scaled points), and as reg falls the entropic value decreases towards the exact one."""
    a, b = two_clouds(seed=8, n0=20, n1=25)
    for power in (1, 2):
        base = wasserstein(a, b, "sinkhorn", reg=0.1, power=power)
        scaled = wasserstein(1e3 * a + 1e3, 1e3 * b + 1e3, "sinkhorn", reg=0.1 * 1e3**power, power=power)
        assert scaled == pytest.approx(1e3 * base, rel=1e-7)
        exact = wasserstein(a, b, power=power)
        sharp = wasserstein(a, b, "sinkhorn", reg=0.03, power=power)
        assert exact < sharp < base
        assert sharp - exact < (base - exact) / 2


def test_wasserstein_sinkhorn_raises_where_the_kernel_underflows():
    """At reg = 0.01 the squared costs of these points reach 1000 reg and exp(-C / reg) underflows: POT's
    iterations stop at once (torchcfm then reports about 6e-8 for a W2 near 3.6); here the plan's marginal
    error is checked and the call raises."""
    a, b = two_clouds(seed=8, n0=20, n1=25)
    with pytest.raises(RuntimeError, match="misses its marginals"):
        wasserstein(a, b, "sinkhorn", reg=0.01, power=2)


def test_wasserstein_rejects_bad_arguments():
    a, b = two_clouds()
    with pytest.raises(ValueError, match="power must be 1 or 2"):
        wasserstein(a, b, power=3)
    with pytest.raises(ValueError, match="method must be"):
        wasserstein(a, b, method="emd")
    with pytest.raises(ValueError, match="reg must be a finite number > 0"):
        wasserstein(a, b, "sinkhorn", reg=0.0)
    with pytest.raises(ValueError, match="per-sample shape"):
        wasserstein(a, b[:, :2])
