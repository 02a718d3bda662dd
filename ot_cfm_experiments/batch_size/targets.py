"""The targets of the batch-size study: measures whose Brenier map T from N(0, I_d) is known.

Closed-form potentials: ``gauss2``, ``gauss8``, ``gauss32`` (N(m, S) with seeded m and S), ``sphere`` (uniform
on S^2) and ``grid`` (5 x 5 atoms with product weights); their samples are T(z), z ~ N(0, I_d), so they are
exact. Fitted potentials: ``moons`` and ``digits``, uniform on a point cloud with the duals of
``fit_discrete_potential``, cached on disk with the fit's report (TV error, cost bracket, seconds).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ot_cfm.data import TensorSampler, gaussian_sampler, load_digits, toy_sampler
from ot_cfm.utils.atomic import save_torch
from ot_cfm_experiments.batch_size.cells import ExperimentConfig
from proximal.discrete import DiscreteBrenierPotential
from proximal.gaussian import GaussianPotential
from proximal.grid import GridPotential
from proximal.potential import BrenierPotential
from proximal.semidiscrete import fit_discrete_potential
from proximal.sphere import SpherePotential

__all__ = ["TARGETS", "TRAINABLE", "Target", "make_target"]

#: targets with an exact (closed-form) or fitted Brenier potential
TARGETS = ("gauss2", "gauss8", "gauss32", "sphere", "grid", "moons", "digits")
#: targets of the trained-model subset (2D toys and the d = 8 Gaussian)
TRAINABLE = ("gauss2", "grid", "moons", "gauss8")


@dataclass
class Target:
    """A target measure with its potential: ``sample(n, generator) -> (n, dim)``; ``note`` describes it."""

    name: str
    potential: BrenierPotential
    sample: Callable[[int, torch.Generator], torch.Tensor]
    note: str
    fit: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.potential.dim


def _gaussian_target(dim: int) -> Target:
    """N(m, S) with S = Q diag(lambda) Q^T, lambda log-spaced in [0.1, 4], Q and m (|m| ~ 1) seeded by dim."""
    g = torch.Generator().manual_seed(1000 + dim)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(math.log10(0.1), math.log10(4.0), dim, dtype=torch.float64)
    cov = (q * eigenvalues) @ q.T
    cov = (cov + cov.T) / 2
    mean = torch.randn(dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    potential = GaussianPotential(mean.float(), cov.float())
    return Target(f"gauss{dim}", potential, _pushforward(potential),
                  f"N(m, S) in d = {dim}, eigenvalues of S log-spaced in [0.1, 4], |m| = {float(mean.norm()):.2f}")


def _pushforward(potential: BrenierPotential) -> Callable[[int, torch.Generator], torch.Tensor]:
    """Target sampler ``T(z)``, z ~ N(0, I) fresh: exact for every closed-form potential."""
    source = gaussian_sampler((potential.dim,))
    return lambda n, generator: potential.transport_map(source(n, generator))


def _fitted_target(name: str, support: torch.Tensor, cache_dir: Path, config: ExperimentConfig,
                   note: str) -> Target:
    """Uniform measure on ``support`` (N, d) with duals from ``fit_discrete_potential``, cached on disk."""
    path = cache_dir / f"potential_{name}_N{support.shape[0]}_t{config.fit_seconds:g}.pt"
    state = torch.load(path, weights_only=True) if path.exists() else None
    if state is not None and "cost_upper_bound" in state["fit"]:  # older caches lack the cost bracket: refit
        potential = DiscreteBrenierPotential(state["support"], None, state["dual_weights"])
        fit = state["fit"]
    else:
        potential = fit_discrete_potential(support, tol=1e-2, max_time=config.fit_seconds, generator=0,
                                           progress=False)
        report = potential.fit_report
        fit = {"tv": report.tv, "tv_noise": report.tv_noise, "converged": report.converged,
               "seconds": report.seconds, "map_cost": report.map_cost, "cost_lower_bound": report.cost_lower_bound,
               "cost_upper_bound": report.cost_upper_bound}
        save_torch(path, {"support": support, "dual_weights": potential.dual_weights, "fit": fit})
    return Target(name, potential, TensorSampler(support), note, fit)


def make_target(name: str, *, cache_dir: str | os.PathLike, config: ExperimentConfig = ExperimentConfig()) -> Target:
    """The target ``name`` (one of TARGETS); fitted potentials are read from / written to ``cache_dir``."""
    cache_dir = Path(cache_dir)
    if name in ("gauss2", "gauss8", "gauss32"):
        return _gaussian_target(int(name[5:]))
    if name == "sphere":
        potential = SpherePotential(1.0, dim=3)
        return Target(name, potential, _pushforward(potential), "uniform on the unit sphere S^2 in R^3")
    if name == "grid":
        points = [torch.linspace(-2.0, 2.0, 5), torch.tensor([-1.5, -0.5, 0.0, 1.0, 2.5])]
        weights = [torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0]) / 9, torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])]
        potential = GridPotential(points, weights)
        return Target(name, potential, _pushforward(potential), "tensor grid of 5 x 5 atoms in R^2, product weights")
    if name == "moons":
        support = toy_sampler("moons")(config.moons_points, torch.Generator().manual_seed(0))
        return _fitted_target(name, support, cache_dir, config,
                              f"{config.moons_points} i.i.d. moons points (toy scale, not standardised), fitted potential")
    if name == "digits":
        images, _ = load_digits()
        return _fitted_target(name, images.flatten(1), cache_dir, config,
                              "scikit-learn digits, 1797 x 64 pixels scaled to [-1, 1], fitted potential")
    raise ValueError(f"unknown target {name!r}; expected one of {TARGETS}")
