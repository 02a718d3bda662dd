"""Minibatch couplers: re-pair a noise batch with a data batch before flow matching."""

from ot_cfm.couplers.base import Coupler
from ot_cfm.couplers.conditional import ClassConditionalCoupler
from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.independent import IndependentCoupler
from ot_cfm.couplers.multiscale import multiscale_assignment
from ot_cfm.couplers.resampled import ResampledCoupler
from ot_cfm.couplers.semidiscrete import SemidiscreteCoupler
from ot_cfm.couplers.sinkhorn import SinkhornCoupler, SinkhornResult
from ot_cfm.couplers.unbalanced import PartialCoupler, UnbalancedCoupler

__all__ = ["Coupler", "ExactOTCoupler", "SinkhornCoupler", "IndependentCoupler", "SemidiscreteCoupler",
           "ClassConditionalCoupler", "multiscale_assignment", "UnbalancedCoupler", "PartialCoupler", "SinkhornResult",
           "ResampledCoupler"]
