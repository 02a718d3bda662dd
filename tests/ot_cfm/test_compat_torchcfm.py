"""ot_cfm.compat.torchcfm against torchcfm itself: names, signatures, and outputs for the same inputs and seeds."""

import importlib
import inspect

import numpy as np
import ot
import pytest
import torch
import torchcfm.conditional_flow_matching as tc_cfm
import torchcfm.models as tc_models
import torchcfm.optimal_transport as tc_ot
import torchcfm.utils as tc_utils

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


@pytest.mark.parametrize("name", ["ConditionalFlowMatcher", "TargetConditionalFlowMatcher",
                                  "VariancePreservingConditionalFlowMatcher"])
@pytest.mark.parametrize("shape", [(2,), (3, 4, 5)])
@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_uncoupled_matchers_equal_torchcfm_bit_for_bit(name, shape, sigma):
    x0, x1 = torch.randn(64, *shape), torch.randn(64, *shape)
    out = []
    for module in (tc_cfm, our_cfm):
        torch.manual_seed(5)
        fm = getattr(module, name)(sigma=sigma)
        t, xt, ut, eps = fm.sample_location_and_conditional_flow(x0, x1, return_noise=True)
        out.append((t, xt, ut, eps, torch.as_tensor(fm.compute_lambda(t))))
    for theirs, ours in zip(*out):  # torchcfm's constant sigma_t and lambda are scalars, ours of t's shape
        assert torch.equal(*torch.broadcast_tensors(theirs, ours))


def test_exact_plan_equals_pot_and_sampling_with_replacement_equals_torchcfm():
    x0, x1 = torch.randn(96, 2, 3), torch.randn(96, 2, 3)
    ours, theirs = our_ot.OTPlanSampler("exact"), tc_ot.OTPlanSampler("exact")
    assert np.array_equal(ours.get_map(x0, x1), theirs.get_map(x0, x1))
    np.random.seed(3)
    a = theirs.sample_plan(x0, x1)  # torchcfm samples with replacement from the plan
    np.random.seed(3)
    b = ours.sample_plan(x0, x1, replace=True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


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
