"""torchcfm's API on ot-cfm: change ``from torchcfm...`` to ``from ot_cfm.compat.torchcfm...`` and nothing else.

Same modules (``conditional_flow_matching``, ``optimal_transport``, ``models``, ``utils``), class and function
names and signatures as torchcfm 1.0.7; the matchers are ot-cfm's (``ot_cfm.matcher``, ``ot_cfm.paths``) and the
plans come from ot-cfm's couplers (exact OT certified by LP duality, log-domain Sinkhorn).

Where ot-cfm deliberately differs:

- the exact plan is used as a permutation: ``OTPlanSampler("exact").sample_plan(x0, x1)`` returns every x0 once,
  in its order, with its optimal partner (torchcfm draws B pairs from the plan with replacement, so some points
  repeat and others are dropped). Pass ``replace=True`` for torchcfm's sampling.
- a Sinkhorn, unbalanced or partial plan that is not finite raises an error instead of falling back, with a
  warning, to the uniform (independent) plan.
"""

from ot_cfm.compat.torchcfm.conditional_flow_matching import (
    ConditionalFlowMatcher,
    ExactOptimalTransportConditionalFlowMatcher,
    SchrodingerBridgeConditionalFlowMatcher,
    TargetConditionalFlowMatcher,
    VariancePreservingConditionalFlowMatcher,
    pad_t_like_x,
)

__all__ = ["ConditionalFlowMatcher", "ExactOptimalTransportConditionalFlowMatcher", "TargetConditionalFlowMatcher",
           "SchrodingerBridgeConditionalFlowMatcher", "VariancePreservingConditionalFlowMatcher", "pad_t_like_x"]
