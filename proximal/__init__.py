"""The exact OT-CFM vector field of any target, from its extended Brenier potential.

For 0 < t < 1 the target point reached through x at time t is a proximal map,
x1(x, t) = prox_{lam phi^*}(x / t) with lam = (1 - t) / t, and u_t(x) = (x1 - x) / (1 - t).
"""

from proximal.discrete import DiscreteBrenierPotential
from proximal.field import ExactVelocityField, FieldErrorReport, field_error
from proximal.gaussian import GaussianPotential
from proximal.grid import GridPotential
from proximal.point import PointPotential
from proximal.potential import BrenierPotential
from proximal.product import ProductPotential
from proximal.semidiscrete import FitReport, cell_masses, fit_discrete_potential
from proximal.sphere import SpherePotential

__all__ = [
    "BrenierPotential", "GaussianPotential", "SpherePotential", "PointPotential", "ProductPotential",
    "GridPotential", "DiscreteBrenierPotential", "ExactVelocityField", "FieldErrorReport", "field_error",
    "fit_discrete_potential", "FitReport", "cell_masses",
]
