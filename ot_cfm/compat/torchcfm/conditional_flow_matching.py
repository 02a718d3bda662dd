"""torchcfm's ``conditional_flow_matching`` module on ot-cfm's matchers and paths.

Each class is ot-cfm's matcher of the same name (``ot_cfm.matcher``) with torchcfm's constructor, and, for
the OT variants, an ``ot_sampler`` (``OTPlanSampler``) that re-pairs the batch first, as torchcfm's does.
Random draws follow torchcfm's order: the plan sampler's (numpy's global generator, only when it samples
with replacement), then t ~ U[0, 1] and eps ~ N(0, I) from torch's, so equal seeds give equal batches.
"""

from __future__ import annotations

from typing import Union

import torch

from ot_cfm import matcher
from ot_cfm.compat.torchcfm.optimal_transport import OTPlanSampler
from ot_cfm.paths import BrownianBridgePath

__all__ = ["pad_t_like_x", "ConditionalFlowMatcher", "ExactOptimalTransportConditionalFlowMatcher",
           "TargetConditionalFlowMatcher", "SchrodingerBridgeConditionalFlowMatcher",
           "VariancePreservingConditionalFlowMatcher"]


def pad_t_like_x(t, x: torch.Tensor):
    """t (B,) reshaped to (B, 1, ..., 1) with x's number of dimensions; a Python number unchanged."""
    if isinstance(t, (float, int)):
        return t
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class _TorchcfmLambda:
    """torchcfm's score weight lambda(t) = 2 sigma_t / (sigma^2 + 1e-8): defined for sigma = 0 as well,
    where ot-cfm's ``compute_lambda`` raises (there is no score to weight)."""

    def compute_lambda(self, t):
        return 2 * self.compute_sigma_t(t) / (self.sigma**2 + 1e-8)


class _PlanSampled:
    """The torchcfm OT matchers' sampling: ``ot_sampler`` re-pairs (x0, x1) (and the labels), then the path."""

    ot_sampler: OTPlanSampler

    def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False):
        """(t, x_t, u_t[, eps]) of the batch re-paired by ``ot_sampler.sample_plan``."""
        x0, x1 = self.ot_sampler.sample_plan(x0, x1)
        return super().sample_location_and_conditional_flow(x0, x1, t, return_noise)

    def guided_sample_location_and_conditional_flow(self, x0, x1, y0=None, y1=None, t=None, return_noise=False):
        """(t, x_t, u_t, y0, y1[, eps]) of the batch and labels re-paired by ``ot_sampler.sample_plan_with_labels``."""
        x0, x1, y0, y1 = self.ot_sampler.sample_plan_with_labels(x0, x1, y0, y1)
        return super().guided_sample_location_and_conditional_flow(x0, x1, y0, y1, t, return_noise)


class ConditionalFlowMatcher(_TorchcfmLambda, matcher.ConditionalFlowMatcher):
    """I-CFM: the straight path x_t = t x1 + (1 - t) x0 + sigma eps, u_t = x1 - x0, the batch as given."""

    def __init__(self, sigma: Union[float, int] = 0.0):
        super().__init__(sigma=sigma)


class ExactOptimalTransportConditionalFlowMatcher(_PlanSampled, ConditionalFlowMatcher):
    """OT-CFM: the straight path after the exact minibatch OT plan (used as a permutation, see the package)."""

    def __init__(self, sigma: Union[float, int] = 0.0):
        super().__init__(sigma)
        self.ot_sampler = OTPlanSampler(method="exact")


class TargetConditionalFlowMatcher(_TorchcfmLambda, matcher.TargetConditionalFlowMatcher):
    """Lipman et al.'s path: mu_t = t x1, sigma_t = 1 - (1 - sigma) t."""

    def __init__(self, sigma: Union[float, int] = 0.0):
        super().__init__(sigma=sigma)


class VariancePreservingConditionalFlowMatcher(_TorchcfmLambda, matcher.VariancePreservingConditionalFlowMatcher):
    """The trigonometric interpolant: mu_t = cos(pi t / 2) x0 + sin(pi t / 2) x1, sigma_t = sigma."""

    def __init__(self, sigma: Union[float, int] = 0.0):
        super().__init__(sigma=sigma)


class _TorchcfmBridge(BrownianBridgePath):
    """The Brownian bridge with torchcfm's flow (1 - 2t) / (2 t (1 - t) + 1e-8) (x_t - mu_t) + x1 - x0, its 1e-8
    included so that outputs match torchcfm's bit for bit (ot-cfm's ``BrownianBridgePath.u_t`` has no offset)."""

    def u_t(self, x0, x1, t, x_t):
        te = pad_t_like_x(torch.as_tensor(t, dtype=x0.dtype, device=x0.device).reshape(-1), x0)
        return (1 - 2 * te) / (2 * te * (1 - te) + 1e-8) * (x_t - self.mu_t(x0, x1, t)) + x1 - x0


class SchrodingerBridgeConditionalFlowMatcher(_PlanSampled, _TorchcfmLambda,
                                              matcher.SchrodingerBridgeConditionalFlowMatcher):
    """SB-CFM: the Brownian bridge sigma_t = sigma sqrt(t (1 - t)) after an OT plan with reg = 2 sigma^2
    (``ot_method`` "exact" by default, as torchcfm's, or "sinkhorn"); sigma must be > 0 (ValueError)."""

    def __init__(self, sigma: Union[float, int] = 1.0, ot_method: str = "exact"):
        # the plan comes from ot_sampler, so the matcher itself has no coupler
        matcher.ConditionalFlowMatcher.__init__(self, coupler=None, path=_TorchcfmBridge(sigma))
        self.ot_method = ot_method
        self.ot_sampler = OTPlanSampler(method=ot_method, reg=2 * self.sigma**2)
