"""Integrating a field: ODE sampling, SDE sampling with a learned score, and likelihoods by the
instantaneous change of variables.

- ``ode``: ``sample(model, x0)`` integrates dx/dt = v(t, x) from t = 0 to 1 (torchdyn's solvers: fixed-step
  Euler and midpoint, adaptive dopri5 and others with an NFE cap), ``SampleResult``, ``IntegrationError``.
- ``sde``: ``sample_sde`` integrates dx = [v + sigma^2 / 2 s] dt + sigma dW (torchsde) for a model with a score.
- ``likelihood``: ``log_likelihood`` and ``bits_per_dim``, log p_1(x) = log p_0(x_0) - int_0^1 div v dt.
"""

from ot_cfm.solvers.likelihood import (
    EXACT_DIVERGENCE_MAX_DIM,
    PIXEL_BIN_WIDTH,
    LikelihoodResult,
    bits_per_dim,
    divergence,
    draw_probes,
    log_likelihood,
)
from ot_cfm.solvers.ode import ADAPTIVE_SOLVERS, DEFAULT_MAX_NFE, FIXED_STEP_SOLVERS, IntegrationError, SampleResult, sample
from ot_cfm.solvers.sde import SDE_SOLVERS, sample_sde

__all__ = ["sample", "SampleResult", "IntegrationError", "FIXED_STEP_SOLVERS", "ADAPTIVE_SOLVERS", "DEFAULT_MAX_NFE",
           "sample_sde", "SDE_SOLVERS", "log_likelihood", "LikelihoodResult", "bits_per_dim", "divergence",
           "draw_probes", "EXACT_DIVERGENCE_MAX_DIM", "PIXEL_BIN_WIDTH"]
