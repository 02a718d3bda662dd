"""Terminal normal hyperbolicity of vector fields near manifold-supported targets.

In rescaled time s = -log(1 - t) an OT-CFM field contracts at rate 1 normally to the target
manifold and is neutral along it; ``measure_hyperbolicity`` measures both for any field.
"""

from manifold_tests.hyperbolicity import measure_hyperbolicity
from manifold_tests.manifolds import (
                                      MANIFOLD_NAMES,
                                      Circle,
                                      CliffordTorus,
                                      Cylinder,
                                      GaussianBlock,
                                      PointBlock,
                                      ProductManifold,
                                      Sphere,
                                      SphereBlock,
                                      Subspace,
                                      manifold_by_name,
)
from manifold_tests.report import HyperbolicityReport

__all__ = [
    "Sphere", "Circle", "Cylinder", "CliffordTorus", "Subspace", "ProductManifold",
    "SphereBlock", "GaussianBlock", "PointBlock", "MANIFOLD_NAMES", "manifold_by_name",
    "measure_hyperbolicity", "HyperbolicityReport",
]
