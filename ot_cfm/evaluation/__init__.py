"""How good a trained field is, and figures of it.

- ``metrics``: exact Wasserstein distances between samples (``wasserstein2``) and path energies.
- ``quality``: ``evaluate_samples``, a field's sample quality at several numbers of function evaluations.
- ``plotting``: 2D flows and trajectories, image grids, figures saved atomically.

Image-specific metrics (Fréchet distances, the feature classifier) are in ``ot_cfm.images``.
"""

from ot_cfm.evaluation import metrics, plotting
from ot_cfm.evaluation.quality import SampleQuality, evaluate_samples, model_device

__all__ = ["SampleQuality", "evaluate_samples", "model_device", "metrics", "plotting"]
