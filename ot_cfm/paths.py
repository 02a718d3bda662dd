"""Conditional probability paths p_t(x | x0, x1) = N(mu_t(x0, x1), sigma_t^2 I) of flow matching.

A path says where a pair (x0, x1) sits at time t and how it moves; the matcher (coupler + path + time
sampling) draws the pairs and the times. Every path gives, for x0, x1, x_t of shape (B, *shape) and t of
shape (B,):

- ``mu_t(x0, x1, t)`` (B, *shape) and ``sigma_t(t)`` (B,): mean and standard deviation of the path;
- ``sample_xt(x0, x1, t, eps)`` = mu_t + sigma_t eps, eps ~ N(0, I) of x0's shape;
- ``u_t(x0, x1, t, x_t)`` (B, *shape): the conditional flow, d/dt of x_t for a fixed eps,
  u_t = mu_t' + (sigma_t' / sigma_t) (x_t - mu_t);
- ``score_t(x0, x1, t, x_t)``: the conditional score grad_x log p_t(x_t | x0, x1) = -(x_t - mu_t) / sigma_t^2,
  where sigma_t > 0;
- ``lambda_t(t)`` = 2 sigma_t / sigma^2 (B,), the weight of torchcfm's score loss
  lambda^2 |s~ + eps / lambda|^2, whose score head learns s~ = (sigma^2 / 2) grad log p_t; it needs sigma > 0.

The four paths (the formulas of torchcfm's matchers, derived in the papers cited per class):

| path | mu_t | sigma_t | u_t |
| --- | --- | --- | --- |
| ``StraightPath`` | t x1 + (1 - t) x0 | sigma | x1 - x0 |
| ``BrownianBridgePath`` | t x1 + (1 - t) x0 | sigma sqrt(t (1 - t)) | (1 - 2t) / (2t (1 - t)) (x_t - mu_t) + x1 - x0 |
| ``TargetPath`` | t x1 (x0 unused) | 1 - (1 - sigma) t | (x1 - (1 - sigma) x_t) / (1 - (1 - sigma) t) |
| ``VariancePreservingPath`` | cos(pi t / 2) x0 + sin(pi t / 2) x1 | sigma | pi / 2 (cos(pi t / 2) x1 - sin(pi t / 2) x0) |
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ot_cfm.utils.validation import as_time_tensor, expand_like

__all__ = ["ProbabilityPath", "StraightPath", "BrownianBridgePath", "TargetPath", "VariancePreservingPath", "PATHS"]


def _check_sigma(sigma, name: str, *, positive: bool = False) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) \
            or sigma < 0 or (positive and sigma == 0):
        raise ValueError(f"{name}: sigma must be finite and {'> 0' if positive else '>= 0'}, got {sigma!r}")
    return float(sigma)


def _float_tensor(t) -> torch.Tensor:
    """t as a floating tensor (a Python float in torch's default dtype)."""
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _time(t, like: torch.Tensor) -> torch.Tensor:
    """t (a float or (B,)) as a (B, 1, ..., 1) tensor in like's dtype and device, broadcasting against like."""
    return expand_like(as_time_tensor(t, like), like)


class ProbabilityPath(ABC):
    """A Gaussian conditional path; subclasses define ``mu_t``, ``sigma_t`` and ``u_t`` (see the module docstring).

    ``sigma`` is the path's noise scale (and the diffusion g = sigma of its SDE); ``has_score`` says
    whether the score-matching loss and the SDE sampler apply (sigma > 0).
    """

    sigma: float

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"

    @property
    def has_score(self) -> bool:
        return self.sigma > 0

    @abstractmethod
    def mu_t(self, x0: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
        """The path's mean at t, (B, *shape); t a float or (B,)."""

    @abstractmethod
    def sigma_t(self, t: torch.Tensor) -> torch.Tensor:
        """The path's standard deviation at t, a tensor of t's shape."""

    @abstractmethod
    def u_t(self, x0: torch.Tensor, x1: torch.Tensor, t, x_t: torch.Tensor) -> torch.Tensor:
        """The conditional flow at (t, x_t), (B, *shape)."""

    def sample_xt(self, x0: torch.Tensor, x1: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x_t = mu_t(x0, x1) + sigma_t eps, of shape (B, *shape)."""
        return self.mu_t(x0, x1, t) + expand_like(self.sigma_t(as_time_tensor(t, x1)), x1) * eps

    def score_t(self, x0: torch.Tensor, x1: torch.Tensor, t, x_t: torch.Tensor) -> torch.Tensor:
        """grad_x log N(x_t; mu_t, sigma_t^2 I) = -(x_t - mu_t) / sigma_t^2, (B, *shape); ValueError where sigma_t = 0."""
        t = as_time_tensor(t, x_t)
        s = self.sigma_t(t)
        if not bool((s > 0).all()):
            raise ValueError(f"{self!r} has sigma_t = 0 at t = {t[s <= 0][:5].tolist()}: the conditional score "
                             "exists only where sigma_t > 0")
        return -(x_t - self.mu_t(x0, x1, t)) / expand_like(s, x_t) ** 2

    def lambda_t(self, t: torch.Tensor) -> torch.Tensor:
        """torchcfm's score-loss weight lambda(t) = 2 sigma_t / sigma^2, shape of t; ValueError for sigma = 0."""
        if not self.has_score:
            raise ValueError(f"{self!r}: lambda(t) = 2 sigma_t / sigma^2 needs sigma > 0 (a path with noise)")
        return 2 * self.sigma_t(_float_tensor(t)) / self.sigma**2


class StraightPath(ProbabilityPath):
    """The straight path with constant noise (I-CFM / OT-CFM; Tong et al. 2024, eq. 14-15):
    mu_t = t x1 + (1 - t) x0, sigma_t = sigma, u_t = x1 - x0."""

    def __init__(self, sigma: float = 0.0):
        self.sigma = _check_sigma(sigma, type(self).__name__)

    def mu_t(self, x0, x1, t):
        """t x1 + (1 - t) x0, (B, *shape)."""
        t = _time(t, x0)
        return t * x1 + (1 - t) * x0

    def sigma_t(self, t):
        """sigma, broadcast to t's shape."""
        return torch.full_like(_float_tensor(t), self.sigma)

    def u_t(self, x0, x1, t, x_t):
        """x1 - x0 (independent of t and x_t)."""
        return x1 - x0


class BrownianBridgePath(StraightPath):
    """The Brownian bridge of diffusion sigma pinned at x0 and x1 (SB-CFM; Tong et al. 2024, "Simulation-free
    Schrodinger bridges via score and flow matching", eq. 20-21):

        mu_t = t x1 + (1 - t) x0,   sigma_t = sigma sqrt(t (1 - t)),
        u_t = (1 - 2t) / (2 t (1 - t)) (x_t - mu_t) + x1 - x0,

    the first term being (sigma_t' / sigma_t) (x_t - mu_t); at t = 0 and 1, where x_t = mu_t, it is taken as 0.
    """

    def __init__(self, sigma: float = 1.0):
        self.sigma = _check_sigma(sigma, "BrownianBridgePath", positive=True)

    def sigma_t(self, t):
        """sigma sqrt(t (1 - t)), shape of t."""
        t = _float_tensor(t)
        return self.sigma * torch.sqrt(t * (1 - t))

    def u_t(self, x0, x1, t, x_t):
        te = _time(t, x0)
        inner = te * (1 - te)
        rate = torch.where(inner > 0, (1 - 2 * te) / (2 * inner).clamp_min(torch.finfo(te.dtype).tiny), 0.0)
        return rate * (x_t - self.mu_t(x0, x1, t)) + x1 - x0


class TargetPath(ProbabilityPath):
    """Lipman et al.'s optimal-transport path from N(0, I) to a point x1 ("Flow matching for generative
    modeling", ICLR 2023, eq. 20-21); x0 is not used (the source is the standard normal itself):

        mu_t = t x1,   sigma_t = 1 - (1 - sigma) t,   u_t = (x1 - (1 - sigma) x_t) / (1 - (1 - sigma) t).

    With sigma = 0 the flow has no value at t = 1 (sigma_t = 0); asking for it there raises ValueError.
    """

    def __init__(self, sigma: float = 0.0):
        self.sigma = _check_sigma(sigma, "TargetPath")

    def mu_t(self, x0, x1, t):
        """t x1, (B, *shape)."""
        return _time(t, x1) * x1

    def sigma_t(self, t):
        """1 - (1 - sigma) t, shape of t."""
        return 1 - (1 - self.sigma) * _float_tensor(t)

    def u_t(self, x0, x1, t, x_t):
        te = _time(t, x1)
        if self.sigma == 0 and bool((te == 1).any()):
            raise ValueError("TargetPath(sigma=0) has no conditional flow at t = 1 (sigma_t = 0); "
                             "expected t < 1, or sigma > 0")
        return (x1 - (1 - self.sigma) * x_t) / (1 - (1 - self.sigma) * te)


class VariancePreservingPath(StraightPath):
    """The trigonometric (variance-preserving) interpolant (Albergo et al. 2023, "Stochastic interpolants",
    eq. 5) with constant noise:

        mu_t = cos(pi t / 2) x0 + sin(pi t / 2) x1,   sigma_t = sigma,   u_t = pi / 2 (cos(pi t / 2) x1 - sin(pi t / 2) x0).
    """

    def mu_t(self, x0, x1, t):
        t = _time(t, x0)
        return torch.cos(math.pi / 2 * t) * x0 + torch.sin(math.pi / 2 * t) * x1

    def u_t(self, x0, x1, t, x_t):
        t = _time(t, x0)
        return math.pi / 2 * (torch.cos(math.pi / 2 * t) * x1 - torch.sin(math.pi / 2 * t) * x0)


#: path name -> class, for configuration by name
PATHS = {"straight": StraightPath, "brownian_bridge": BrownianBridgePath, "target": TargetPath,
         "variance_preserving": VariancePreservingPath}
