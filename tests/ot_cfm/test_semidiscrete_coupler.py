"""Population coupling: each x0 goes to the support point of its Laguerre cell, labels follow."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from ot_cfm.couplers.semidiscrete import SemidiscreteCoupler
from proximal.discrete import DiscreteBrenierPotential
from proximal.sphere import SpherePotential

F64 = torch.float64


def _potential(n=25, d=4):
    gen = torch.Generator().manual_seed(0)
    return DiscreteBrenierPotential(torch.randn(n, d, generator=gen, dtype=F64), None,
                                    0.5 * torch.randn(n, generator=gen, dtype=F64))


def _laguerre(potential, x0):
    y, g = potential.support.numpy(), potential.dual_weights.numpy()
    return np.argmax(x0.reshape(x0.shape[0], -1).numpy() @ y.T - g, axis=1)


def test_pairs_each_source_point_with_its_laguerre_cell():
    potential = _potential()
    labels = torch.arange(25) % 3
    coupler = SemidiscreteCoupler(potential, support_labels=labels)
    x0 = torch.randn(300, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    x1 = torch.randn(50, 4, dtype=F64)  # ignored but for shape, device and dtype
    cells = _laguerre(potential, x0)
    i, j = coupler.indices(x0, x1)
    np.testing.assert_array_equal(i.numpy(), np.arange(300))
    np.testing.assert_array_equal(j.numpy(), cells)
    y0 = torch.arange(300)
    a, b, ya, yb = coupler.pair(x0, x1, y0, torch.zeros(50, dtype=torch.long))
    torch.testing.assert_close(a, x0, atol=0, rtol=0)
    torch.testing.assert_close(b, potential.support[cells], atol=0, rtol=0)
    np.testing.assert_array_equal(ya.numpy(), y0.numpy())
    np.testing.assert_array_equal(yb.numpy(), cells % 3)
    plan = coupler.plan(x0, x1)
    assert plan.shape == (300, 25)
    torch.testing.assert_close(plan.sum(1), torch.full((300,), 1 / 300, dtype=F64))
    np.testing.assert_array_equal(plan.argmax(1).numpy(), cells)


def test_image_shaped_batches_and_float32():
    potential = _potential(d=4)
    coupler = SemidiscreteCoupler(potential)
    x0 = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    a, b = coupler.pair(x0, torch.zeros(8, 1, 2, 2))
    assert b.shape == x0.shape and b.dtype == torch.float32
    np.testing.assert_array_equal(b.reshape(64, 4).double().numpy(),
                                  potential.support[_laguerre(potential, x0)].float().double().numpy())
    a, b = coupler.pair(x0, None)
    assert b.shape == x0.shape


def test_closed_form_potential_pairs_with_its_map():
    potential = SpherePotential(2.0, dim=3)
    coupler = SemidiscreteCoupler(potential)
    x0 = torch.randn(50, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    a, b = coupler.pair(x0, x0)
    torch.testing.assert_close(b, potential.transport_map(x0))
    a, b, ya, yb = coupler.pair(x0, x0, y0=torch.arange(50))
    assert yb is None
    with pytest.raises(ValueError, match="DiscreteBrenierPotential"):
        coupler.indices(x0, x0)
    with pytest.raises(ValueError, match="DiscreteBrenierPotential"):
        coupler.plan(x0, x0)


def test_bad_input_raises():
    potential = _potential()
    with pytest.raises(ValueError):
        SemidiscreteCoupler(potential, support_labels=torch.arange(24))
    with pytest.raises(ValueError):
        SemidiscreteCoupler("not a potential")
    with pytest.raises(ValueError):
        SemidiscreteCoupler(SpherePotential(dim=3), support_labels=torch.arange(3))
    coupler = SemidiscreteCoupler(potential)
    x0 = torch.randn(10, 4, dtype=F64)
    for call in [lambda: coupler.pair(torch.randn(10, 3, dtype=F64), None),
                 lambda: coupler.pair(x0, torch.randn(10, 3, dtype=F64)),
                 lambda: coupler.pair(x0, x0.float()),
                 lambda: coupler.pair(x0.index_fill(0, torch.tensor([2]), float("nan")), x0),
                 lambda: coupler.pair(x0, x0, torch.arange(9)),
                 lambda: coupler.pair(x0, x0, None, torch.arange(10))]:
        with pytest.raises(ValueError):
            call()


def test_proximal_imports_first_without_a_cycle():
    """proximal imports ot_cfm.utils.validation, whose package imports this coupler: it must not need proximal at import."""
    subprocess.run([sys.executable, "-c", "import proximal.discrete"], check=True, capture_output=True)
