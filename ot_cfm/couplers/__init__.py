"""Minibatch couplers: re-pair a noise batch x0 (B0, ...) with a data batch x1 (B1, ...) before flow matching.

- ``base``: ``Coupler``, the interface (``pair``, ``indices``, ``plan``), on the input's device and dtype.
- ``exact``: ``ExactOTCoupler``, exact OT for the squared Euclidean cost (scipy, POT, or the certified
  ``multiscale`` backend: shortest augmenting paths (``augmenting_paths``, numba) warm-started from k-d levels
  (``kd_pyramid``), every answer certified by its duals on all B^2 costs).
- ``sinkhorn``: ``SinkhornCoupler``, log-domain entropic OT in torch. ``unbalanced``: ``UnbalancedCoupler`` and
  ``PartialCoupler``, plans that may drop mass.
- ``independent``: ``IndependentCoupler`` (I-CFM's pairing). ``semidiscrete``: ``SemidiscreteCoupler``, the
  population coupling of a fitted potential. ``conditional``: ``ClassConditionalCoupler``, within classes.
  ``resampled``: ``ResampledCoupler``, pairs drawn with replacement from any coupler's pairs.
"""

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
