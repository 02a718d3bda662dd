"""Conditional flow matching: a matcher is a coupler, a probability path and the sampling of t.

A coupler (exact OT, Sinkhorn, independent, semidiscrete) re-pairs (x0, x1); the matcher draws t ~ U[0, 1]
and eps ~ N(0, I), and a path (``ot_cfm.paths``) gives the location and the regression target:

    x_t = mu_t(x0, x1) + sigma_t eps,     u_t = u_t(x0, x1, t, x_t).

The default path is the straight one with constant sigma, x_t = t x1 + (1 - t) x0 + sigma eps and
u_t = x1 - x0 (Lipman et al. 2023; Tong et al. 2024, "Improving and generalizing flow-based generative
models with minibatch optimal transport"), with torchcfm's formulas and random stream. The other matchers
of torchcfm's family are the same class with another path (and coupler): ``TargetConditionalFlowMatcher``,
``VariancePreservingConditionalFlowMatcher``, ``SchrodingerBridgeConditionalFlowMatcher`` (Sinkhorn with
epsilon = 2 sigma^2 and the Brownian bridge; Tong et al. 2024, "Simulation-free Schrodinger bridges via
score and flow matching").

Score matching: for a model with a score head (``has_score(model)``, e.g. ``FlowAndScore``) the loss adds

    E |sigma_t s(t, x_t) + eps|^2  =  E lambda(t)^2 |s~ + eps / lambda(t)|^2,   s~ = (sigma^2 / 2) s,

which is torchcfm's score term with lambda(t) = 2 sigma_t / sigma^2: torchcfm's head learns s~, ours the
score s = grad log p_t itself, so that the SDE dx = [v + sigma^2 / 2 s] dt + sigma dW (``ot_cfm.solvers.sde``)
takes the model's two outputs as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ot_cfm.couplers.base import Coupler
from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.independent import IndependentCoupler
from ot_cfm.couplers.sinkhorn import SinkhornCoupler
from ot_cfm.models import drop_labels, has_score, is_conditional
from ot_cfm.paths import BrownianBridgePath, ProbabilityPath, StraightPath, TargetPath, VariancePreservingPath
from ot_cfm.utils.validation import check_pair, check_time, expand_like

__all__ = ["FlowSample", "LossTerms", "ConditionalFlowMatcher", "OTConditionalFlowMatcher",
           "TargetConditionalFlowMatcher", "VariancePreservingConditionalFlowMatcher",
           "SchrodingerBridgeConditionalFlowMatcher", "COUPLERS"]

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

    def select(self, rows) -> FlowSample:
        """The batch restricted to ``rows`` (a slice or an index tensor) of every tensor."""
        return FlowSample(**{k: None if v is None else v[rows] for k, v in vars(self).items()})


@dataclass(frozen=True)
class LossTerms:
    """The loss of one batch: ``flow`` = mean |v(t, x_t) - u_t|^2 and, for a model with a score head,
    ``score`` = mean |sigma_t s(t, x_t) + eps|^2 (else None); scalar tensors. ``total`` is their sum."""

    flow: torch.Tensor
    score: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        return self.flow if self.score is None else self.flow + self.score


class ConditionalFlowMatcher:
    """Draws (t, x_t, u_t) from a coupled batch along a probability path and computes the flow-matching loss.

    Args:
        coupler: re-pairs (x0, x1) before interpolation: a ``Coupler`` instance, or "exact",
            "sinkhorn", "independent" for that coupler with its defaults; None keeps the given
            pairing (independent CFM when x0 and x1 are independent draws).
        sigma: standard deviation of the Gaussian smoothing of the straight path (default 0: deterministic).
        path: a ``ot_cfm.paths.ProbabilityPath``; default ``StraightPath(sigma)``. When a path is given,
            ``sigma`` is the path's and may be omitted (a different value is an error).

    torchcfm's per-formula methods (``compute_mu_t``, ``compute_sigma_t``, ``sample_xt``,
    ``compute_conditional_flow``, ``compute_lambda``, ``sample_noise_like``) delegate to the path.
    """

    def __init__(self, coupler: Coupler | None = None, sigma: float | None = None,
                 path: ProbabilityPath | None = None):
        if path is None:
            path = StraightPath(0.0 if sigma is None else sigma)
        elif not isinstance(path, ProbabilityPath):
            raise ValueError(f"path must be an ot_cfm.paths.ProbabilityPath (e.g. StraightPath(0.1), "
                             f"BrownianBridgePath(1.0)), got {path!r} of type {type(path).__name__}")
        elif sigma is not None and sigma != path.sigma:
            raise ValueError(f"sigma={sigma} disagrees with the path's sigma, {path!r}; give sigma once, in the path")
        self.coupler = _as_coupler(coupler)
        self.path = path

    @property
    def sigma(self) -> float:
        """The path's noise scale."""
        return self.path.sigma

    def __repr__(self) -> str:
        return f"{type(self).__name__}(coupler={self.coupler!r}, path={self.path!r})"

    # torchcfm's per-formula methods, on the path
    def compute_mu_t(self, x0: torch.Tensor, x1: torch.Tensor, t) -> torch.Tensor:
        """mu_t(x0, x1), (B, *shape)."""
        return self.path.mu_t(x0, x1, t)

    def compute_sigma_t(self, t) -> torch.Tensor:
        """sigma_t, a tensor of t's shape."""
        return self.path.sigma_t(t)

    def sample_xt(self, x0: torch.Tensor, x1: torch.Tensor, t, epsilon: torch.Tensor) -> torch.Tensor:
        """x_t = mu_t + sigma_t epsilon, (B, *shape)."""
        return self.path.sample_xt(x0, x1, t, epsilon)

    def compute_conditional_flow(self, x0: torch.Tensor, x1: torch.Tensor, t, xt: torch.Tensor) -> torch.Tensor:
        """u_t(x0, x1, t, x_t), (B, *shape)."""
        return self.path.u_t(x0, x1, t, xt)

    def compute_lambda(self, t) -> torch.Tensor:
        """torchcfm's score-loss weight 2 sigma_t / sigma^2, a tensor of t's shape (needs sigma > 0)."""
        return self.path.lambda_t(t)

    def sample_noise_like(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """eps ~ N(0, I) of x's shape, dtype and device, drawn with ``generator`` (torch's default when None)."""
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

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
        noise = self.sample_noise_like(x0, generator)
        x_t = self.path.sample_xt(x0, x1, t, noise)
        return FlowSample(t=t, x_t=x_t, u_t=self.path.u_t(x0, x1, t, x_t), x0=x0, x1=x1, noise=noise, y0=y0, y1=y1)

    def sample_location_and_conditional_flow(self, x0: torch.Tensor, x1: torch.Tensor,
                                             t: torch.Tensor | None = None, return_noise: bool = False):
        """torchcfm's signature: (t, x_t, u_t) or (t, x_t, u_t, eps) with return_noise."""
        s = self.sample(x0, x1, t)
        return (s.t, s.x_t, s.u_t, s.noise) if return_noise else (s.t, s.x_t, s.u_t)

    def guided_sample_location_and_conditional_flow(self, x0: torch.Tensor, x1: torch.Tensor,
                                                    y0: torch.Tensor | None = None, y1: torch.Tensor | None = None,
                                                    t: torch.Tensor | None = None, return_noise: bool = False):
        """torchcfm's signature: (t, x_t, u_t, y0, y1) or (t, x_t, u_t, y0, y1, eps) with return_noise; the
        labels (B,) follow their points through the coupling (None stays None)."""
        s = self.sample(x0, x1, t, y0=y0, y1=y1)
        out = (s.t, s.x_t, s.u_t, s.y0, s.y1)
        return (*out, s.noise) if return_noise else out

    def loss_terms(self, model, x0: torch.Tensor, x1: torch.Tensor, *,
                   generator: torch.Generator | None = None, coupled: bool = False, y1: torch.Tensor | None = None,
                   label_dropout: float = 0.0) -> LossTerms:
        """The flow term mean |v(t, x_t) - u_t|^2 (mean over batch and coordinates) and, when the model has a
        score head (``has_score(model)``), the score term mean |sigma_t s(t, x_t) + eps|^2; ``coupled`` as in
        ``sample``.

        Class-conditional: with data labels ``y1`` (B,) the model is called ``model(t, x_t, y)`` (it must be
        conditional, ``is_conditional(model)``), y being the labels after coupling; with ``label_dropout`` = p,
        each is replaced by ``model.null_label`` with probability p (drawn with ``generator`` after t and eps),
        which trains the unconditional field that classifier-free guidance needs (``guided_field``). A score
        head gets the same labels.
        """
        conditional, scored = is_conditional(model), has_score(model)
        if (y1 is not None) != conditional:
            raise ValueError(
                f"labels y1 were given but the model is unconditional ({type(model).__name__} without num_classes)"
                if y1 is not None else
                f"the model is class-conditional ({type(model).__name__} with num_classes={model.num_classes}): "
                "pass the data labels y1 (from a labelled sampler)")
        if not 0.0 <= label_dropout <= 1.0 or (label_dropout > 0 and not conditional):
            raise ValueError(f"label_dropout must lie in [0, 1] and needs a class-conditional model, got "
                             f"{label_dropout} with {'a conditional' if conditional else 'an unconditional'} model")
        self.check_score_head(model)
        s = self.sample(x0, x1, y1=y1, generator=generator, coupled=coupled)
        args = (s.t, s.x_t) if not conditional else (s.t, s.x_t, drop_labels(s.y1, label_dropout, model.null_label,
                                                                              generator))
        return self.regression_terms(s, model(*args), model.score(*args) if scored else None)

    def check_score_head(self, model) -> None:
        """ValueError when ``model`` has a score head (``has_score``) but the path has no noise to score."""
        if has_score(model) and not self.path.has_score:
            raise ValueError(f"the model has a score head but the path {self.path!r} has no noise: score matching "
                             "needs sigma > 0 (e.g. SchrodingerBridgeConditionalFlowMatcher(sigma=1.0))")

    def regression_terms(self, s: FlowSample, v: torch.Tensor, score: torch.Tensor | None = None) -> LossTerms:
        """The loss terms of a model's outputs at (s.t, s.x_t): flow = mean |v - u_t|^2 (v of x_t's shape) and, given
        the score head's output, score = mean |sigma_t score + eps|^2."""
        if v.shape != s.u_t.shape:
            raise ValueError(f"model returned shape {tuple(v.shape)}, expected {tuple(s.u_t.shape)} (the shape of x_t)")
        flow = torch.mean((v - s.u_t) ** 2)
        if score is None:
            return LossTerms(flow)
        if score.shape != s.x_t.shape:
            raise ValueError(f"model.score returned shape {tuple(score.shape)}, expected {tuple(s.x_t.shape)} "
                             "(the shape of x_t)")
        sigma_t = expand_like(self.path.sigma_t(s.t), s.x_t)
        return LossTerms(flow, torch.mean((sigma_t * score + s.noise) ** 2))

    def loss(self, model, x0: torch.Tensor, x1: torch.Tensor, *,
             generator: torch.Generator | None = None, coupled: bool = False, y1: torch.Tensor | None = None,
             label_dropout: float = 0.0) -> torch.Tensor:
        """The scalar training loss, ``loss_terms(...).total``: mean |v(t, x_t) - u_t|^2, plus the score term
        mean |sigma_t s(t, x_t) + eps|^2 for a model with a score head; arguments as in ``loss_terms``."""
        return self.loss_terms(model, x0, x1, generator=generator, coupled=coupled, y1=y1,
                               label_dropout=label_dropout).total


class OTConditionalFlowMatcher(ConditionalFlowMatcher):
    """The matcher with the exact minibatch OT coupler (OT-CFM)."""

    def __init__(self, sigma: float = 0.0, backend: str = "auto"):
        super().__init__(coupler=ExactOTCoupler(backend=backend), sigma=sigma)


class TargetConditionalFlowMatcher(ConditionalFlowMatcher):
    """Lipman et al.'s flow matching: ``TargetPath(sigma)`` (mu_t = t x1, sigma_t = 1 - (1 - sigma) t, x0 unused
    beyond being N(0, I) noise), no coupler unless one is given."""

    def __init__(self, sigma: float = 0.0, coupler: Coupler | str | None = None):
        super().__init__(coupler=coupler, path=TargetPath(sigma))


class VariancePreservingConditionalFlowMatcher(ConditionalFlowMatcher):
    """The trigonometric interpolant: ``VariancePreservingPath(sigma)``, no coupler unless one is given."""

    def __init__(self, sigma: float = 0.0, coupler: Coupler | str | None = None):
        super().__init__(coupler=coupler, path=VariancePreservingPath(sigma))


class SchrodingerBridgeConditionalFlowMatcher(ConditionalFlowMatcher):
    """Schrodinger-bridge CFM: the entropic OT coupling with epsilon = 2 sigma^2 (absolute cost units), the
    static Schrodinger bridge between the batches for Brownian motion of diffusion sigma, and
    ``BrownianBridgePath(sigma)`` between the pairs. Train a ``FlowAndScore`` model to get the score for
    ``ot_cfm.solvers.sde.sample_sde``; as sigma -> 0 the pairs become those of exact OT (OT-CFM).

    Args:
        sigma: diffusion of the bridge, > 0.
        coupler: None or "sinkhorn" for ``SinkhornCoupler(epsilon=2 sigma^2, relative=False)``; a
            ``SinkhornCoupler`` must have that epsilon, absolute (e.g. with more ``max_iters`` for small sigma);
            any other coupler (e.g. "exact", torchcfm's default in practice) is used as given.
    """

    def __init__(self, sigma: float = 1.0, coupler: Coupler | str | None = None):
        path = BrownianBridgePath(sigma)
        epsilon = 2 * path.sigma**2
        if coupler is None or (isinstance(coupler, str) and coupler == "sinkhorn"):
            coupler = SinkhornCoupler(epsilon=epsilon, relative=False)
        elif isinstance(coupler, SinkhornCoupler) and (coupler.relative or not math.isclose(coupler.epsilon, epsilon)):
            raise ValueError(f"the Schrodinger bridge of diffusion sigma={path.sigma} needs Sinkhorn with epsilon = "
                             f"2 sigma^2 = {epsilon} in absolute cost units, got {coupler!r}; pass "
                             f"SinkhornCoupler(epsilon={epsilon}, relative=False, ...)")
        super().__init__(coupler=coupler, path=path)
