"""The manifold example in quick mode: exact, learned and empirical fields measured end to end."""

import math

import pytest
import torch

from manifold_tests import experiment


@pytest.fixture(scope="module")
def example():
    return experiment


def test_quick_example_runs_and_writes_results(example, tmp_path):
    reports = example.run(quick=True, out_dir=tmp_path)
    assert {"exact/sphere", "exact/cylinder", "exact/torus", "learned/sphere", "learned/torus",
            "empirical-100/sphere", "empirical-1000/sphere"} <= set(reports)
    for name in ("sphere", "cylinder", "torus"):
        assert reports[f"exact/{name}"].is_normally_hyperbolic(normal_tol=1e-6, tangent_tol=1e-2)
    for name in ("sphere", "torus"):
        learned = reports[f"learned/{name}"]
        assert bool(torch.isfinite(learned.rho_N).all() and torch.isfinite(learned.rho_T).all())
        # a smooth model has a bounded Jacobian, so (1 - t) D v cannot keep rho_N at -1 as t -> 1
        assert not learned.is_normally_hyperbolic()
    # neutrality of the empirical target breaks later for more samples
    t100, t1000 = (example.break_time(reports[f"empirical-{n}/sphere"]) for n in (100, 1000))
    assert not math.isnan(t100) and not math.isnan(t1000) and t100 < t1000
    text = (tmp_path / "manifold_hyperbolicity.md").read_text()
    assert "rho_N t=0.999" in text and "| sphere | learned" in text
    for figure in ("manifold_hyperbolicity_rates.png", "manifold_hyperbolicity_empirical.png"):
        assert (tmp_path / figure).stat().st_size > 1000


def test_cli_entry_for_one_manifold(example, tmp_path, capsys):
    assert example.main(["--quick", "--manifold", "circle", "--out", str(tmp_path)]) == 0
    assert "exact/circle: normally hyperbolic" in capsys.readouterr().out
    assert (tmp_path / "manifold_circle.md").exists()
