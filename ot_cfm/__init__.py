"""ot-cfm: minibatch optimal-transport conditional flow matching.

Data flow: a coupler re-pairs noise x0 with data x1; the matcher draws t and builds x_t and
u_t; the Trainer fits a model v(t, x); ``sample`` integrates v from noise to data (torchdyn).
"""

from ot_cfm import data, image_data, image_metrics, likelihood, metrics, paths, sde
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
from ot_cfm.distributed import COUPLING_MODES, DistributedContext, init_from_env
from ot_cfm.evaluation import SampleQuality, evaluate_samples
from ot_cfm.image_data import ImageDataset, load_image_dataset
from ot_cfm.likelihood import LikelihoodResult, bits_per_dim, log_likelihood
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
from ot_cfm.sampling import IntegrationError, SampleResult, sample
from ot_cfm.sde import sample_sde
from ot_cfm.trainer import TrainConfig, Trainer, TrainResult

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
    "data", "image_data", "image_metrics", "likelihood", "metrics", "paths", "sde",
]
