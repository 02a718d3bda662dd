"""ot-cfm: minibatch optimal-transport conditional flow matching.

Data flow: a coupler (``couplers``) re-pairs noise x0 with data x1; the matcher (``matcher``, over the
probability ``paths``) draws t and builds x_t and u_t; the ``Trainer`` (``training``) fits a model v(t, x)
(``models``) on batches of ``data`` or ``images``; ``sample`` (``solvers``) integrates v from noise to data;
``evaluation`` measures the result.

The names below are the public API. The module attributes ``image_data``, ``image_metrics``, ``likelihood``,
``metrics`` and ``sde`` are kept from the flat layout of earlier versions: they are the subpackage or module that
now holds those names (``images``, ``images``, ``solvers.likelihood``, ``evaluation.metrics``, ``solvers.sde``).
"""

from ot_cfm import couplers, data, evaluation, images, models, paths, solvers, training, utils
from ot_cfm.couplers import (
    ClassConditionalCoupler,
    Coupler,
    ExactOTCoupler,
    IndependentCoupler,
    PartialCoupler,
    ResampledCoupler,
    SemidiscreteCoupler,
    SinkhornCoupler,
    UnbalancedCoupler,
)
from ot_cfm.evaluation import SampleQuality, evaluate_samples
from ot_cfm.evaluation import metrics as metrics
from ot_cfm.images import ImageDataset, load_image_dataset
from ot_cfm.matcher import (
    ConditionalFlowMatcher,
    FlowSample,
    LossTerms,
    OTConditionalFlowMatcher,
    SchrodingerBridgeConditionalFlowMatcher,
    TargetConditionalFlowMatcher,
    VariancePreservingConditionalFlowMatcher,
)
from ot_cfm.models import MLP, FlowAndScore, UNet, guided_field, has_score, is_conditional, unet_for
from ot_cfm.paths import BrownianBridgePath, ProbabilityPath, StraightPath, TargetPath, VariancePreservingPath
from ot_cfm.solvers import IntegrationError, LikelihoodResult, SampleResult, bits_per_dim, log_likelihood, sample, sample_sde
from ot_cfm.solvers import likelihood as likelihood
from ot_cfm.solvers import sde as sde
from ot_cfm.training import COUPLING_MODES, DistributedContext, TrainConfig, Trainer, TrainResult, init_from_env

image_data = image_metrics = images  # the flat layout's module names (see the docstring)

__version__ = "0.1.0"

__all__ = [
    "Coupler", "ExactOTCoupler", "SinkhornCoupler", "IndependentCoupler", "SemidiscreteCoupler",
    "ClassConditionalCoupler", "UnbalancedCoupler", "PartialCoupler", "ResampledCoupler",
    "ConditionalFlowMatcher", "OTConditionalFlowMatcher", "FlowSample", "LossTerms",
    "TargetConditionalFlowMatcher", "VariancePreservingConditionalFlowMatcher", "SchrodingerBridgeConditionalFlowMatcher",
    "ProbabilityPath", "StraightPath", "BrownianBridgePath", "TargetPath", "VariancePreservingPath",
    "MLP", "UNet", "FlowAndScore", "unet_for", "guided_field", "is_conditional", "has_score",
    "sample", "SampleResult", "IntegrationError", "sample_sde",
    "log_likelihood", "LikelihoodResult", "bits_per_dim",
    "Trainer", "TrainConfig", "TrainResult", "COUPLING_MODES", "DistributedContext", "init_from_env",
    "SampleQuality", "evaluate_samples", "ImageDataset", "load_image_dataset",
    "couplers", "data", "evaluation", "images", "models", "paths", "solvers", "training", "utils",
    "image_data", "image_metrics", "likelihood", "metrics", "sde",
]
