"""ot_cfm.compat.torchcfm against torchcfm itself: names, signatures, and outputs for the same inputs and seeds."""

import importlib
import inspect
import math
import pydoc

import numpy as np
import ot
import pytest
import torch
import torchcfm
import torchcfm.conditional_flow_matching as tc_cfm
import torchcfm.models as tc_models
import torchcfm.models.unet.unet
import torchcfm.optimal_transport as tc_ot
import torchcfm.utils as tc_utils

import ot_cfm.compat.torchcfm as ours_top
import ot_cfm.compat.torchcfm.conditional_flow_matching as our_cfm
import ot_cfm.compat.torchcfm.models as our_models
import ot_cfm.compat.torchcfm.optimal_transport as our_ot
import ot_cfm.compat.torchcfm.utils as our_utils

MODULES = [("conditional_flow_matching", tc_cfm), ("optimal_transport", tc_ot), ("utils", tc_utils),
           ("models", tc_models)]
MATCHERS = ["ConditionalFlowMatcher", "ExactOptimalTransportConditionalFlowMatcher", "TargetConditionalFlowMatcher",
            "SchrodingerBridgeConditionalFlowMatcher", "VariancePreservingConditionalFlowMatcher"]


def _public(module):
    """Names a torchcfm user imports from ``module``: its own functions and classes (not re-exported imports)."""
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    own = module.__name__.rsplit(".", 1)[0]
    return sorted(n for n in names if (inspect.isclass(getattr(module, n)) or inspect.isfunction(getattr(module, n)))
                  and getattr(getattr(module, n), "__module__", "").startswith(own))


#: the deliberate differences (documented in ot_cfm.compat.torchcfm): the exact plan is a permutation unless
#: replace=True, so the default of ``replace`` is None ("True, except for exact OT") instead of True
DEFAULTS_CHANGED = {("OTPlanSampler.sample_plan", "replace"): None, ("OTPlanSampler.sample_plan_with_labels", "replace"): None}


def _parameters(fn, qualname=""):
    return [(p.name, DEFAULTS_CHANGED.get((qualname, p.name), p.default)) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name, theirs", MODULES)
def test_every_torchcfm_name_exists_with_its_signature(name, theirs):
    ours = importlib.import_module(f"ot_cfm.compat.torchcfm.{name}")
    for attr in _public(theirs):
        assert hasattr(ours, attr), f"ot_cfm.compat.torchcfm.{name} lacks torchcfm's {attr}"
        their_obj, our_obj = getattr(theirs, attr), getattr(ours, attr)
        # torchcfm's parameters come first, with torchcfm's names and defaults; ours may add optional ones after
        their_params = _parameters(their_obj)
        assert _parameters(our_obj)[:len(their_params)] == their_params, f"{name}.{attr}"
        if inspect.isclass(their_obj):
            for method in [m for m in vars(their_obj) if not m.startswith("_") and callable(getattr(their_obj, m))]:
                their_params = _parameters(getattr(their_obj, method), f"{attr}.{method}")
                assert _parameters(getattr(our_obj, method))[:len(their_params)] == their_params, f"{attr}.{method}"


#: the modules of torchcfm that scripts import, with the names ``import *`` brings from them
STAR_MODULES = ["", ".conditional_flow_matching", ".optimal_transport", ".utils", ".models", ".models.models",
                ".models.unet", ".models.unet.unet", ".models.unet.nn", ".models.unet.fp16_util", ".models.unet.logger"]
#: torchcfm's own names that its ``import *`` brings and the drop-in's does not: submodules (torchcfm's package
#: brings models and utils only once something else has imported them; models.unet's are imported by name)
NOT_STARRED = {"": {"models", "utils"}, ".models.unet": {"unet", "nn", "fp16_util", "logger"}}
#: names the drop-in's ``import *`` brings beyond torchcfm's (ot-cfm's additions, documented in the modules)
STAR_EXTRAS = {"": {"check_config_targets"}, ".models": {"GradModel", "UNetModel"}}


def _star(module: str) -> dict:
    namespace = {}
    exec(f"from {module} import *", namespace)
    namespace.pop("__builtins__")
    return namespace


def _origin(obj) -> str:
    return obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None) or ""


@pytest.mark.parametrize("module", STAR_MODULES)
def test_star_import_brings_torchcfm_names(module):
    """``from ot_cfm.compat.torchcfm<module> import *`` brings the names torchcfm's defines (OTPlanSampler from
    conditional_flow_matching, the package's modules, ...), not the libraries its modules import (torch, np: the
    drop-in's ``__all__`` is its documented API); models.unet's modules are torchcfm's, re-exported whole."""
    theirs, ours = _star("torchcfm" + module), _star("ot_cfm.compat.torchcfm" + module)
    if module.startswith(".models.unet."):
        assert ours.keys() == theirs.keys() and all(ours[n] is theirs[n] for n in theirs)
        return
    own = {n for n, obj in theirs.items() if _origin(obj).startswith("torchcfm")} - NOT_STARRED.get(module, set())
    assert set(ours) == own | STAR_EXTRAS.get(module, set())
    for name in own:
        assert ours[name] is theirs[name] or _origin(ours[name]).startswith("ot_cfm.compat.torchcfm"), name


def test_package_has_torchcfm_top_level_names_and_version():
    expected = {n for n in dir(torchcfm) if not n.startswith("_") and _origin(getattr(torchcfm, n)).startswith("torchcfm")}
    assert expected | {"__version__"} <= set(dir(ours_top))
    assert ours_top.__version__ == ours_top.version.__version__ == torchcfm.__version__ == "1.0.7"
    assert ours_top.OTPlanSampler is our_ot.OTPlanSampler


@pytest.mark.parametrize("name", ["ConditionalFlowMatcher", "TargetConditionalFlowMatcher",
                                  "VariancePreservingConditionalFlowMatcher"])
@pytest.mark.parametrize("shape", [(2,), (3, 4, 5)])
@pytest.mark.parametrize("sigma", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uncoupled_matchers_equal_torchcfm_bit_for_bit(name, shape, sigma, dtype):
    x0, x1 = torch.randn(64, *shape, dtype=dtype), torch.randn(64, *shape, dtype=dtype)
    out = []
    for module in (tc_cfm, our_cfm):
        torch.manual_seed(5)
        fm = getattr(module, name)(sigma=sigma)
        out.append(fm.sample_location_and_conditional_flow(x0, x1, return_noise=True))
    for theirs, ours in zip(*out):
        assert torch.equal(theirs, ours)


@pytest.mark.parametrize("layout", ["default dtype float64", "transposed x0", "channels_last x0"])
def test_draws_follow_torchcfm_for_default_dtype_and_memory_layout(layout):
    """t is drawn in torch's default dtype on its default device, then cast and moved (torch.rand(B).type_as(x0),
    on a GPU too), eps with x0's memory layout (torch.randn_like(x0))."""
    x0, x1 = torch.randn(8, 3, 4, 5), torch.randn(8, 3, 4, 5)
    if layout == "transposed x0":
        x0, x1 = x0.reshape(8, 60).t(), x1.reshape(8, 60).t()
    elif layout == "channels_last x0":
        x0 = x0.to(memory_format=torch.channels_last)
    out, default = [], torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64 if layout.startswith("default") else default)
        for module in (tc_cfm, our_cfm):
            torch.manual_seed(3)
            out.append(module.ConditionalFlowMatcher(0.5).sample_location_and_conditional_flow(x0, x1, return_noise=True))
    finally:
        torch.set_default_dtype(default)
    for theirs, ours in zip(*out):
        assert torch.equal(theirs, ours) and theirs.stride() == ours.stride()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["ConditionalFlowMatcher", "TargetConditionalFlowMatcher",
                                  "VariancePreservingConditionalFlowMatcher"])
def test_matchers_on_a_gpu_equal_torchcfm(name):
    x0, x1 = torch.randn(64, 3, 8, 8, device="cuda"), torch.randn(64, 3, 8, 8, device="cuda")
    out = []
    for module in (tc_cfm, our_cfm):
        torch.manual_seed(5)
        out.append(getattr(module, name)(sigma=0.2).sample_location_and_conditional_flow(x0, x1, return_noise=True))
    for theirs, ours in zip(*out):
        assert ours.device == x0.device and torch.equal(theirs, ours)


@pytest.mark.parametrize("name", MATCHERS)
@pytest.mark.parametrize("t", [0.25, torch.tensor([0.1, 0.5, 0.9])], ids=["float t", "tensor t"])
def test_sigma_t_and_lambda_have_torchcfm_types_and_values(name, t):
    """sigma_t and lambda: torchcfm's Python numbers for the constant-sigma matchers whatever t is, else tensors
    for a tensor t and numbers for a number t (torchcfm's SB raises TypeError on a number)."""
    theirs, ours = getattr(tc_cfm, name)(sigma=0.5), getattr(our_cfm, name)(sigma=0.5)
    for method in ("compute_sigma_t", "compute_lambda"):
        mine = getattr(ours, method)(t)
        if name.startswith("Schrodinger") and not isinstance(t, torch.Tensor):
            with pytest.raises(TypeError):
                getattr(theirs, method)(t)
            expected = 0.5 * math.sqrt(t * (1 - t)) * (1 if method == "compute_sigma_t" else 2 / (0.25 + 1e-8))
            assert type(mine) is float and mine == pytest.approx(expected, rel=1e-15)
            continue
        reference = getattr(theirs, method)(t)
        assert type(mine) is type(reference)
        assert torch.equal(mine, reference) if isinstance(mine, torch.Tensor) else mine == reference


def test_exact_plan_equals_pot_and_sampling_with_replacement_equals_torchcfm():
    x0, x1 = torch.randn(96, 2, 3), torch.randn(96, 2, 3)
    ours, theirs = our_ot.OTPlanSampler("exact"), tc_ot.OTPlanSampler("exact")
    assert np.array_equal(ours.get_map(x0, x1), theirs.get_map(x0, x1))
    np.random.seed(3)
    a = theirs.sample_plan(x0, x1)  # torchcfm samples with replacement from the plan
    np.random.seed(3)
    b = ours.sample_plan(x0, x1, replace=True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("method, kwargs", [("exact", {}), ("sinkhorn", {"reg": 0.5}),
                                            ("unbalanced", {"reg": 0.5, "reg_m": 2.0}), ("partial", {"reg": 2.0})])
def test_ot_fn_is_torchcfms_solver_of_the_method(method, kwargs):
    x0, x1 = torch.randn(20, 2), torch.randn(30, 2)
    a, b, cost = ot.unif(20), ot.unif(30), (torch.cdist(x0, x1) ** 2).numpy()
    ours, theirs = our_ot.OTPlanSampler(method, **kwargs), tc_ot.OTPlanSampler(method, **kwargs)
    assert np.array_equal(ours.ot_fn(a, b, cost), theirs.ot_fn(a, b, cost))


def test_a_replaced_ot_fn_is_used_as_torchcfm_uses_it():
    """A script's own ot_fn gets torchcfm's (a, b, M) (M normalised here) and its plan is sampled with replacement,
    as torchcfm samples it, even for method "exact"."""
    x0, x1 = torch.randn(32, 2, 2), torch.randn(32, 2, 2)
    costs, pairs = [], []

    def solver(a, b, cost):
        costs.append(cost)
        return ot.sinkhorn(a, b, cost, reg=0.1)

    for module in (tc_ot, our_ot):
        sampler = module.OTPlanSampler("exact", normalize_cost=True)
        sampler.ot_fn = solver
        np.random.seed(0)
        pairs.append(sampler.sample_plan(x0, x1))
    assert np.array_equal(costs[0], costs[1]) and costs[0].max() == 1
    assert all(torch.equal(p, q) for p, q in zip(*pairs))
    sampler = our_ot.OTPlanSampler("exact")
    sampler.ot_fn = lambda a, b, cost: np.ones(3)
    with pytest.raises(ValueError, match=r"ot_fn returned a plan of shape \(3,\), expected \(32, 32\)"):
        sampler.get_map(x0, x1)


def test_check_config_targets_names_each_torchcfm_target_and_its_replacement():
    """A hydra config (torchcfm's runner/configs/model/cfm_v2.yaml's flow_matcher, say) whose _target_ names
    torchcfm would build torchcfm's class: the check names the key and a replacement that resolves."""
    config = {"model": {"flow_matcher": {"_target_": "torchcfm.ConditionalFlowMatcher", "sigma": 0.0},
                        "net": {"_target_": "src.models.components.simple_mlp.VelocityNet"}},
              "extra": [{"_target_": "torchcfm.models.unet.unet.UNetModelWrapper"}, {"_target_": "torchcfmx.Other"},
                        {"_target_": "ot_cfm.compat.torchcfm.utils.torch_wrapper"}]}
    with pytest.raises(ValueError) as error:
        ours_top.check_config_targets(config)
    lines = [line.strip() for line in str(error.value).splitlines()[1:]]
    assert lines == ["config.model.flow_matcher._target_: torchcfm.ConditionalFlowMatcher -> "
                     "ot_cfm.compat.torchcfm.ConditionalFlowMatcher",
                     "config.extra[0]._target_: torchcfm.models.unet.unet.UNetModelWrapper -> "
                     "ot_cfm.compat.torchcfm.models.unet.unet.UNetModelWrapper"]
    assert pydoc.locate("ot_cfm.compat.torchcfm.ConditionalFlowMatcher") is our_cfm.ConditionalFlowMatcher
    assert pydoc.locate("ot_cfm.compat.torchcfm.models.unet.unet.UNetModelWrapper") is not None
    config["model"]["flow_matcher"]["_target_"] = "ot_cfm.compat.torchcfm.ConditionalFlowMatcher"
    del config["extra"][0]
    ours_top.check_config_targets(config)


@pytest.mark.parametrize("method, normalize, reg", [("unbalanced", False, 0.5), ("unbalanced", True, 0.5),
                                                 ("partial", False, 2.0), ("partial", True, 0.5)])
def test_mass_dropping_plans_equal_torchcfm_up_to_their_mass(method, normalize, reg):
    torch.manual_seed(0)
    x0, x1 = torch.randn(40, 2), torch.randn(50, 2)
    x1[:5] += 4  # outliers
    kwargs = {"reg": reg, "reg_m": 1.0, "normalize_cost": normalize}
    theirs = tc_ot.OTPlanSampler(method, **kwargs).get_map(x0, x1)
    ours = our_ot.OTPlanSampler(method, **kwargs).get_map(x0, x1)
    assert np.abs(ours - theirs / theirs.sum()).max() < 1e-4 * theirs.max() / theirs.sum()
    if method == "unbalanced" and not normalize:  # outliers keep less than their share (in absolute cost units;
        assert ours[:, :5].sum() < 0.5 * 5 / 50     # torchcfm's "partial" moves all the mass)


def test_a_plan_that_fails_raises_where_torchcfm_returns_nan():
    torch.manual_seed(0)
    x0, x1 = torch.randn(40, 2), torch.randn(50, 2) + 4
    with pytest.raises(RuntimeError, match="raise epsilon"):
        our_ot.OTPlanSampler("partial", reg=0.05).get_map(x0, x1)


def test_exact_plan_is_used_as_a_permutation_by_default():
    """The deliberate difference: every x0 once, in its order, with its optimal partner; no numpy draw."""
    x0, x1 = torch.randn(80, 3), torch.randn(80, 3)
    plan = tc_ot.OTPlanSampler("exact").get_map(x0, x1)
    state = np.random.get_state()
    p0, p1, y0, y1 = our_ot.OTPlanSampler("exact").sample_plan_with_labels(x0, x1, torch.arange(80), torch.arange(80))
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(p0, x0) and torch.equal(y0, torch.arange(80))
    assert sorted(y1.tolist()) == list(range(80)) and torch.equal(p1, x1[y1])
    assert all(plan[i, j] > 0 for i, j in enumerate(y1.tolist()))


def test_exact_matcher_draws_t_and_noise_like_torchcfm_after_the_permutation():
    x0, x1 = torch.randn(64, 2), torch.randn(64, 2)
    torch.manual_seed(1)
    t, xt, ut, eps = our_cfm.ExactOptimalTransportConditionalFlowMatcher(sigma=0.1).sample_location_and_conditional_flow(
        x0, x1, return_noise=True)
    p0, p1 = our_ot.OTPlanSampler("exact").sample_plan(x0, x1)
    torch.manual_seed(1)
    t_ref, xt_ref, ut_ref, eps_ref = tc_cfm.ConditionalFlowMatcher(sigma=0.1).sample_location_and_conditional_flow(
        p0, p1, return_noise=True)
    for ours, theirs in ((t, t_ref), (xt, xt_ref), (ut, ut_ref), (eps, eps_ref)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("ot_method", ["exact", "sinkhorn"])
def test_schrodinger_bridge_flow_equals_torchcfm_and_sinkhorn_plan_equals_pot(ot_method):
    x0, x1 = torch.randn(48, 2), torch.randn(48, 2) + 1
    ours = our_cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=0.7, ot_method=ot_method)
    theirs = tc_cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=0.7, ot_method=ot_method)
    t = torch.rand(48)
    xt = torch.randn(48, 2)
    assert torch.equal(ours.compute_conditional_flow(x0, x1, t, xt), theirs.compute_conditional_flow(x0, x1, t, xt))
    assert torch.equal(ours.compute_sigma_t(t), theirs.compute_sigma_t(t))
    if ot_method == "sinkhorn":
        reference = ot.sinkhorn(ot.unif(48), ot.unif(48), (torch.cdist(x0, x1) ** 2).double().numpy(), reg=2 * 0.7**2,
                                numItermax=100_000, stopThr=1e-12)
        np.testing.assert_allclose(ours.ot_sampler.get_map(x0, x1), reference, atol=1e-6)
    with pytest.raises(ValueError):
        our_cfm.SchrodingerBridgeConditionalFlowMatcher(sigma=0)


def test_guided_matcher_carries_labels_with_their_points():
    x0, x1 = torch.randn(32, 2), torch.randn(32, 2)
    y1 = torch.arange(32)
    t, xt, ut, y0, y1_out = our_cfm.ExactOptimalTransportConditionalFlowMatcher().guided_sample_location_and_conditional_flow(
        x0, x1, y1=y1)
    assert y0 is None and torch.equal(ut, x1[y1_out] - x0)


@pytest.mark.parametrize("method, power", [("exact", 1), ("exact", 2), (None, 2), ("sinkhorn", 2)])
def test_wasserstein_equals_torchcfm(method, power):
    x0, x1 = torch.randn(50, 2, 2), torch.randn(60, 2, 2)
    assert our_ot.wasserstein(x0, x1, method, reg=0.5, power=power) == tc_ot.wasserstein(x0, x1, method, reg=0.5,
                                                                                            power=power)
    with pytest.raises(ValueError):
        our_ot.wasserstein(x0, x1, "noname")


def test_sample_trajectory_follows_the_exact_partners():
    X = torch.randn(40, 4, 2)
    traj = our_ot.OTPlanSampler("exact").sample_trajectory(X)
    assert traj.shape == (40, 4, 2)
    rows = np.arange(40)
    for k in range(3):
        plan = tc_ot.OTPlanSampler("exact").get_map(X[:, k], X[:, k + 1])
        rows = plan[rows].argmax(axis=1)
        np.testing.assert_array_equal(traj[:, k + 1], X[:, k + 1][rows].numpy())


@pytest.mark.parametrize("time_varying, out_dim", [(True, None), (False, 5)])
def test_mlp_loads_torchcfm_weights_and_computes_the_same(time_varying, out_dim):
    theirs = tc_models.MLP(dim=3, out_dim=out_dim, w=32, time_varying=time_varying)
    ours = our_models.MLP(dim=3, out_dim=out_dim, w=32, time_varying=time_varying)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    z = torch.randn(10, 3 + time_varying)
    assert torch.equal(ours(z), theirs(z))
    action = tc_models.MLP(dim=3, out_dim=1, w=16, time_varying=True)
    z = torch.randn(10, 4)
    assert torch.equal(our_models.GradModel(action)(z.clone()), tc_models.models.GradModel(action)(z.clone()))


def test_torch_wrapper_and_unet_are_torchcfm_compatible():
    model = tc_models.MLP(dim=2, w=16, time_varying=True)
    x, t = torch.randn(7, 2), torch.tensor(0.3)
    assert torch.equal(our_utils.torch_wrapper(model)(t, x), tc_utils.torch_wrapper(model)(t, x))
    unet = our_models.UNetModel(dim=(1, 28, 28), num_channels=32, num_res_blocks=1, num_classes=10, class_cond=True)
    assert unet(torch.rand(2), torch.randn(2, 1, 28, 28), y=torch.tensor([1, 2])).shape == (2, 1, 28, 28)


def test_toy_samplers_draw_what_torchcfm_draws_for_the_same_seeds():
    for ours, theirs in ((our_utils.sample_8gaussians, tc_utils.sample_8gaussians),
                         (our_utils.sample_moons, tc_utils.sample_moons),
                         (lambda n: our_utils.eight_normal_sample(n, 2, 3, 0.5),
                          lambda n: tc_utils.eight_normal_sample(n, 2, 3, 0.5))):
        torch.manual_seed(4)
        np.random.seed(4)
        a = ours(500)
        torch.manual_seed(4)
        np.random.seed(4)
        assert torch.allclose(a, theirs(500), rtol=0, atol=1e-6)
    assert abs(float(our_utils.sample_8gaussians(4000).norm(dim=1).mean()) - 5.0) < 0.2
    with pytest.raises(ValueError, match="dim must be 2"):
        our_utils.eight_normal_sample(10, 3)
