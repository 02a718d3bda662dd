"""Conditional flow matching: the straight interpolant, its regression target and the loss.

Formulas (Lipman et al. 2023; Tong et al. 2024, "Improving and generalizing flow-based
generative models with minibatch optimal transport"), identical to torchcfm's:

    x_t = t x1 + (1 - t) x0 + sigma * eps,     u_t = x1 - x0,     eps ~ N(0, I)

A coupler (exact OT, Sinkhorn, independent, semidiscrete) re-pairs (x0, x1) first; the matcher takes
a ``Coupler`` instance or, as torchcfm's ``ot_method`` is written, one of the names in ``COUPLERS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ot_cfm.couplers.base import Coupler
from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.independent import IndependentCoupler
from ot_cfm.couplers.sinkhorn import SinkhornCoupler
from ot_cfm.models import drop_labels, is_conditional
from ot_cfm.validation import check_pair, check_time, expand_like

__all__ = ["FlowSample", "ConditionalFlowMatcher", "OTConditionalFlowMatcher", "COUPLERS"]

#: coupler names the matcher accepts, each built with its defaults (torchcfm's ``ot_method`` spellings)
COUPLERS = {"exact": ExactOTCoupler, "sinkhorn": SinkhornCoupler, "independent": IndependentCoupler}


def _as_coupler(coupler) -> Coupler | None:
    """None, a Coupler instance, or the default coupler named by a key of ``COUPLERS``; else ValueError."""
    if coupler is None or isinstance(coupler, Coupler):
        return coupler
    if isinstance(coupler, str) and coupler in COUPLERS:
        return COUPLERS[coupler]()
    if isinstance(coupler, type) and issubclass(coupler, Coupler):
        raise ValueError(f"coupler must be an instance, got the class {coupler.__name__}; "
                         f"pass {coupler.__name__}() instead")
    raise ValueError(f"coupler must be None, a Coupler instance (e.g. ExactOTCoupler()) or one of the names "
                     f"{sorted(COUPLERS)}, got {coupler!r} of type {type(coupler).__name__}")


@dataclass(frozen=True)
class FlowSample:
    """One training batch of conditional flow matching; tensors of shape (B,) or (B, *shape)."""

    t: torch.Tensor
    x_t: torch.Tensor
    u_t: torch.Tensor
    x0: torch.Tensor
    x1: torch.Tensor
    noise: torch.Tensor
    y0: torch.Tensor | None = None
    y1: torch.Tensor | None = None


class ConditionalFlowMatcher:
    """Draws (t, x_t, u_t) from a coupled batch and computes the flow-matching loss.

    Args:
        coupler: re-pairs (x0, x1) before interpolation: a ``Coupler`` instance, or "exact",
            "sinkhorn", "independent" for that coupler with its defaults; None keeps the given
            pairing (independent CFM when x0 and x1 are independent draws).
        sigma: standard deviation of the Gaussian smoothing of the path (0 = deterministic).
    """

    def __init__(self, coupler: Coupler | None = None, sigma: float = 0.0):
        if not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
        self.coupler = _as_coupler(coupler)
        self.sigma = float(sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(coupler={self.coupler!r}, sigma={self.sigma})"

    def couple(self, x0: torch.Tensor, x1: torch.Tensor, y0: torch.Tensor | None = None,
               y1: torch.Tensor | None = None, *, generator: torch.Generator | None = None) -> tuple:
        """(x0, x1, y0, y1) re-paired by the coupler (unchanged without one); labels follow their points."""
        check_pair(x0, x1, same_batch_size=self.coupler is None or self.coupler.requires_equal_sizes)
        if self.coupler is None:
            return x0, x1, y0, y1
        paired = self.coupler.pair(x0, x1, y0, y1, generator=generator)
        return paired if len(paired) == 4 else (*paired, None, None)

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | float | None = None, *,
               y0: torch.Tensor | None = None, y1: torch.Tensor | None = None,
               generator: torch.Generator | None = None, coupled: bool = False) -> FlowSample:
        """Couple (x0, x1) (skipped when ``coupled``: the pairs come from ``couple`` already), draw
        t ~ U[0, 1] (unless given) and eps, return the batch as a FlowSample.

        The draws go through ``generator`` (torch's default generator when None): the coupler's first,
        then t, then eps, in the order torchcfm uses, so equal seeds give equal batches.
        """
        if coupled:
            check_pair(x0, x1)
        else:
            x0, x1, y0, y1 = self.couple(x0, x1, y0, y1, generator=generator)
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(f"after coupling, x0 and x1 must have one batch size, got {x0.shape[0]} and {x1.shape[0]}")
        if t is None:
            t = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
        else:
            t = check_time(t, x0)
        # eps is drawn even when sigma = 0 so that the random stream matches torchcfm's.
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        te = expand_like(t, x0)
        x_t = te * x1 + (1 - te) * x0 + self.sigma * noise
        return FlowSample(t=t, x_t=x_t, u_t=x1 - x0, x0=x0, x1=x1, noise=noise, y0=y0, y1=y1)

    def sample_location_and_conditional_flow(self, x0: torch.Tensor, x1: torch.Tensor,
                                             t: torch.Tensor | None = None, return_noise: bool = False):
        """torchcfm's signature: (t, x_t, u_t) or (t, x_t, u_t, eps) with return_noise."""
        s = self.sample(x0, x1, t)
        return (s.t, s.x_t, s.u_t, s.noise) if return_noise else (s.t, s.x_t, s.u_t)

    def loss(self, model, x0: torch.Tensor, x1: torch.Tensor, *,
             generator: torch.Generator | None = None, coupled: bool = False, y1: torch.Tensor | None = None,
             label_dropout: float = 0.0) -> torch.Tensor:
        """Mean squared error E |v(t, x_t) - u_t|^2 (mean over batch and coordinates), a scalar tensor;
        ``coupled`` as in ``sample``.

        Class-conditional: with data labels ``y1`` (B,) the model is called ``model(t, x_t, y)`` (it must be
        conditional, ``is_conditional(model)``), y being the labels after coupling; with ``label_dropout`` = p,
        each is replaced by ``model.null_label`` with probability p (drawn with ``generator`` after t and eps),
        which trains the unconditional field that classifier-free guidance needs (``guided_field``).
        """
        conditional = is_conditional(model)
        if (y1 is not None) != conditional:
            raise ValueError(
                f"labels y1 were given but the model is unconditional ({type(model).__name__} without num_classes)"
                if y1 is not None else
                f"the model is class-conditional ({type(model).__name__} with num_classes={model.num_classes}): "
                "pass the data labels y1 (from a labelled sampler)")
        if not 0.0 <= label_dropout <= 1.0 or (label_dropout > 0 and not conditional):
            raise ValueError(f"label_dropout must lie in [0, 1] and needs a class-conditional model, got "
                             f"{label_dropout} with {'a conditional' if conditional else 'an unconditional'} model")
        s = self.sample(x0, x1, y1=y1, generator=generator, coupled=coupled)
        if conditional:
            y = drop_labels(s.y1, label_dropout, model.null_label, generator)
            v = model(s.t, s.x_t, y)
        else:
            v = model(s.t, s.x_t)
        if v.shape != s.u_t.shape:
            raise ValueError(f"model returned shape {tuple(v.shape)}, expected {tuple(s.u_t.shape)} (the shape of x_t)")
        return torch.mean((v - s.u_t) ** 2)


class OTConditionalFlowMatcher(ConditionalFlowMatcher):
    """The matcher with the exact minibatch OT coupler (OT-CFM)."""

    def __init__(self, sigma: float = 0.0, backend: str = "auto"):
        super().__init__(coupler=ExactOTCoupler(backend=backend), sigma=sigma)
