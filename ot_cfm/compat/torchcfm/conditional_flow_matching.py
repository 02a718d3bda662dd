"""torchcfm's ``conditional_flow_matching`` module on ot-cfm's matchers and paths.

Each class is ot-cfm's matcher of the same name (``ot_cfm.matcher``) with torchcfm's constructor, and, for
the OT variants, an ``ot_sampler`` (``OTPlanSampler``) that re-pairs the batch first, as torchcfm's does.
torchcfm's methods draw as torchcfm does, so equal seeds give equal batches for every dtype and device: the
plan sampler's draws (numpy's global generator, only when it samples with replacement), then
t = ``torch.rand(B).type_as(x0)`` (torch's default generator, dtype and device, then cast and moved to x0's:
on a GPU too) and eps = ``torch.randn_like(x0)``. ``compute_sigma_t`` and ``compute_lambda`` return what
torchcfm's return: the Python number sigma (and 2 sigma / (sigma^2 + 1e-8)) for the constant-sigma matchers
whatever t is, else a tensor for a tensor t and a number for a number t.
"""

from __future__ import annotations

import math
from typing import Union

import torch

from ot_cfm import matcher
from ot_cfm.compat.torchcfm.optimal_transport import OTPlanSampler
from ot_cfm.paths import BrownianBridgePath

# with OTPlanSampler, which ``from torchcfm.conditional_flow_matching import *`` brings too
__all__ = ["pad_t_like_x", "ConditionalFlowMatcher", "ExactOptimalTransportConditionalFlowMatcher",
           "TargetConditionalFlowMatcher", "SchrodingerBridgeConditionalFlowMatcher",
           "VariancePreservingConditionalFlowMatcher", "OTPlanSampler"]


def pad_t_like_x(t, x: torch.Tensor):
    """t (B,) reshaped to (B, 1, ..., 1) with x's number of dimensions; a Python number unchanged."""
    if isinstance(t, (float, int)):
        return t
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _torchcfm_t(t, x0: torch.Tensor):
    """t as given, or torchcfm's draw: U[0, 1) in torch's default dtype and device, cast and moved to x0's."""
    return torch.rand(x0.shape[0]).type_as(x0) if t is None else t


class _Torchcfm:
    """torchcfm's draws and return types over an ot-cfm matcher: t and eps drawn as torchcfm draws them (module
    docstring), sigma_t = sigma as a number, lambda(t) = 2 sigma_t / (sigma^2 + 1e-8), defined for sigma = 0 as
    well (where ot-cfm's ``compute_lambda`` raises: there is no score to weight)."""

    def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False):
        """(t, x_t, u_t[, eps]); t drawn as torchcfm draws it when None."""
        return super().sample_location_and_conditional_flow(x0, x1, _torchcfm_t(t, x0), return_noise)

    def guided_sample_location_and_conditional_flow(self, x0, x1, y0=None, y1=None, t=None, return_noise=False):
        """(t, x_t, u_t, y0, y1[, eps]); t drawn as torchcfm draws it when None."""
        return super().guided_sample_location_and_conditional_flow(x0, x1, y0, y1, _torchcfm_t(t, x0), return_noise)

    def sample_noise_like(self, x, generator=None):
        """eps ~ N(0, I) like x: ``torch.randn_like(x)`` (x's memory layout too), or from ``generator`` when given."""
        return torch.randn_like(x) if generator is None else super().sample_noise_like(x, generator)

    def compute_sigma_t(self, t):
        """sigma, a Python number, for every t (the constant-sigma paths)."""
        return self.sigma

    def compute_lambda(self, t):
        """2 sigma_t / (sigma^2 + 1e-8), of ``compute_sigma_t``'s type."""
        return 2 * self.compute_sigma_t(t) / (self.sigma**2 + 1e-8)


class _PlanSampled:
    """The torchcfm OT matchers' sampling: ``ot_sampler`` re-pairs (x0, x1) (and the labels), then t, eps, the path."""

    ot_sampler: OTPlanSampler

    def sample_location_and_conditional_flow(self, x0, x1, t=None, return_noise=False):
        """(t, x_t, u_t[, eps]) of the batch re-paired by ``ot_sampler.sample_plan``."""
        x0, x1 = self.ot_sampler.sample_plan(x0, x1)
        return super().sample_location_and_conditional_flow(x0, x1, t, return_noise)

    def guided_sample_location_and_conditional_flow(self, x0, x1, y0=None, y1=None, t=None, return_noise=False):
        """(t, x_t, u_t, y0, y1[, eps]) of the batch and labels re-paired by ``ot_sampler.sample_plan_with_labels``."""
        x0, x1, y0, y1 = self.ot_sampler.sample_plan_with_labels(x0, x1, y0, y1)
        return super().guided_sample_location_and_conditional_flow(x0, x1, y0, y1, t, return_noise)


class ConditionalFlowMatcher(_Torchcfm, matcher.ConditionalFlowMatcher):
    """I-CFM: the straight path x_t = t x1 + (1 - t) x0 + sigma eps, u_t = x1 - x0, the batch as given."""

    def __init__(self, sigma: Union[float, int] = 0.0):
        super().__init__(sigma=sigma)


class ExactOptimalTransportConditionalFlowMatcher(_PlanSampled, ConditionalFlowMatcher):
    """OT-CFM: the straight path after the exact minibatch OT plan (used as a permutation, see the package)."""

    def __init__(self, sigma: Union[float, int] = 0.0):
        super().__init__(sigma)
        self.ot_sampler = OTPlanSampler(method="exact")


class TargetConditionalFlowMatcher(_Torchcfm, matcher.TargetConditionalFlowMatcher):
    """Lipman et al.'s path: mu_t = t x1, sigma_t = 1 - (1 - sigma) t."""

    def __init__(self, sigma: Union[float, int] = 0.0):
        super().__init__(sigma=sigma)

    def compute_sigma_t(self, t):
        """1 - (1 - sigma) t: a tensor of t's shape for a tensor t, a number for a number."""
        return 1 - (1 - self.sigma) * t


class VariancePreservingConditionalFlowMatcher(_Torchcfm, matcher.VariancePreservingConditionalFlowMatcher):
    """The trigonometric interpolant: mu_t = cos(pi t / 2) x0 + sin(pi t / 2) x1, sigma_t = sigma."""

    def __init__(self, sigma: Union[float, int] = 0.0):
        super().__init__(sigma=sigma)


class _TorchcfmBridge(BrownianBridgePath):
    """The Brownian bridge with torchcfm's flow (1 - 2t) / (2 t (1 - t) + 1e-8) (x_t - mu_t) + x1 - x0, its 1e-8
    included so that outputs match torchcfm's bit for bit (ot-cfm's ``BrownianBridgePath.u_t`` has no offset)."""

    def u_t(self, x0, x1, t, x_t):
        te = pad_t_like_x(torch.as_tensor(t, dtype=x0.dtype, device=x0.device).reshape(-1), x0)
        return (1 - 2 * te) / (2 * te * (1 - te) + 1e-8) * (x_t - self.mu_t(x0, x1, t)) + x1 - x0


class SchrodingerBridgeConditionalFlowMatcher(_PlanSampled, _Torchcfm, matcher.SchrodingerBridgeConditionalFlowMatcher):
    """SB-CFM: the Brownian bridge sigma_t = sigma sqrt(t (1 - t)) after an OT plan with reg = 2 sigma^2
    (``ot_method`` "exact" by default, as torchcfm's, or "sinkhorn"); sigma must be > 0 (ValueError)."""

    def __init__(self, sigma: Union[float, int] = 1.0, ot_method: str = "exact"):
        # the plan comes from ot_sampler, so the matcher itself has no coupler
        matcher.ConditionalFlowMatcher.__init__(self, coupler=None, path=_TorchcfmBridge(sigma))
        self.ot_method = ot_method
        self.ot_sampler = OTPlanSampler(method=ot_method, reg=2 * self.sigma**2)

    def compute_sigma_t(self, t):
        """sigma sqrt(t (1 - t)): a tensor of t's shape for a tensor t, a number for a number (torchcfm's raises
        TypeError there)."""
        root = torch.sqrt if isinstance(t, torch.Tensor) else math.sqrt
        return self.sigma * root(t * (1 - t))
