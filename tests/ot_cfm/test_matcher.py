import ot
import pytest
import torch
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher as TorchCFMMatcher

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.independent import IndependentCoupler
from ot_cfm.couplers.sinkhorn import SinkhornCoupler
from ot_cfm.matcher import COUPLERS, ConditionalFlowMatcher, OTConditionalFlowMatcher


@pytest.mark.parametrize("sigma", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(64, 2), (16, 1, 8, 8)])
def test_equals_torchcfm_with_same_seed(sigma, shape):
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    torch.manual_seed(123)
    theirs = TorchCFMMatcher(sigma=sigma).sample_location_and_conditional_flow(x0, x1, return_noise=True)
    torch.manual_seed(123)
    ours = ConditionalFlowMatcher(sigma=sigma).sample_location_and_conditional_flow(x0, x1, return_noise=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_given_t_and_interpolant_endpoints():
    x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
    m = ConditionalFlowMatcher()
    s0 = m.sample(x0, x1, t=torch.zeros(5))
    s1 = m.sample(x0, x1, t=1.0)
    torch.testing.assert_close(s0.x_t, x0)
    torch.testing.assert_close(s1.x_t, x1)
    torch.testing.assert_close(s0.u_t, x1 - x0)


def test_generator_makes_draws_reproducible_without_global_rng():
    x0, x1 = torch.randn(8, 2), torch.randn(8, 2)
    m = ConditionalFlowMatcher(sigma=0.1)
    a = m.sample(x0, x1, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(999)  # the global stream must not matter
    b = m.sample(x0, x1, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.x_t, b.x_t)


def test_loss_is_zero_for_the_exact_conditional_field():
    x0, x1 = torch.randn(32, 2), torch.randn(32, 2)
    shift = x1 - x0

    def field(t, x):  # the conditional target itself, known because the pairing is fixed
        return shift

    assert ConditionalFlowMatcher().loss(field, x0, x1).item() == 0.0
    assert ConditionalFlowMatcher().loss(lambda t, x: torch.zeros_like(x), x0, x1).item() > 0.5


@pytest.mark.parametrize("bad, match", [
    ((torch.full((4, 2), float("nan")), torch.randn(4, 2)), "NaN"),
    ((torch.randn(4, 2), torch.randn(4, 3)), "per-sample shape"),
    ((torch.randn(4, 2), torch.randn(5, 2)), "batch size"),
    ((torch.randn(0, 2), torch.randn(0, 2)), "empty"),
])
def test_bad_batches_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        ConditionalFlowMatcher().sample(*bad)


@pytest.mark.parametrize("t", [1.5, -0.1, float("nan")])
def test_time_outside_unit_interval_raises(t):
    with pytest.raises(ValueError, match="t "):
        ConditionalFlowMatcher().sample(torch.randn(4, 2), torch.randn(4, 2), t=torch.full((4,), t))


@pytest.mark.parametrize("sigma", [-0.1, float("nan"), float("inf")])
def test_sigma_must_be_finite_and_non_negative(sigma):
    with pytest.raises(ValueError, match="sigma must be finite"):
        ConditionalFlowMatcher(sigma=sigma)


def test_model_of_wrong_output_shape_raises():
    with pytest.raises(ValueError, match="model returned shape"):
        ConditionalFlowMatcher().loss(lambda t, x: x[:, :1], torch.randn(4, 2), torch.randn(4, 2))


def test_sample_of_a_coupled_batch_equals_sample_that_couples():
    from ot_cfm.couplers.sinkhorn import SinkhornCoupler
    x0, x1 = torch.randn(32, 2), torch.randn(32, 2) + 3
    m = ConditionalFlowMatcher(SinkhornCoupler(epsilon=0.5), sigma=0.2)
    whole = m.sample(x0, x1, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    a, b, _, _ = m.couple(x0, x1, generator=g)
    split = m.sample(a, b, generator=g, coupled=True)
    for name in ("t", "x_t", "u_t", "x0", "x1", "noise"):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), rtol=0, atol=0)
    assert not torch.equal(whole.x1, x1)  # the Sinkhorn draw did re-pair the batch


def test_coupled_batch_is_validated():
    with pytest.raises(ValueError, match="same batch size"):
        ConditionalFlowMatcher().sample(torch.randn(4, 2), torch.randn(5, 2), coupled=True)


def sorted_rows(x: torch.Tensor) -> list:
    return sorted(map(tuple, x.tolist()))


def test_ot_matcher_pairs_by_the_exact_optimal_permutation():
    """OTConditionalFlowMatcher: at t = 0, x_t are the source points and x_t + u_t the target points,
    each used once, and the mean |u_t|^2 is the optimal transport cost from POT on the same batch
    (an independent or identity pairing is about 2x that cost on these batches)."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    x1 = torch.randn(64, 3, generator=g, dtype=torch.float64) + torch.tensor([4.0, 0.0, 0.0], dtype=torch.float64)
    t, xt, ut = OTConditionalFlowMatcher(sigma=0.0).sample_location_and_conditional_flow(
        x0, x1, t=torch.zeros(64, dtype=torch.float64))
    assert torch.equal(t, torch.zeros(64, dtype=torch.float64))
    assert sorted_rows(xt) == sorted_rows(x0)
    torch.testing.assert_close(torch.tensor(sorted_rows(xt + ut)), torch.tensor(sorted_rows(x1)), rtol=0, atol=1e-12)
    weights = torch.full((64,), 1 / 64, dtype=torch.float64).numpy()
    optimum = ot.emd2(weights, weights, ot.dist(x0.numpy(), x1.numpy()), numItermax=10**7)
    assert abs(float(ut.square().sum(1).mean()) - optimum) < 1e-10 * optimum


@pytest.mark.parametrize("name, kind", [("exact", ExactOTCoupler), ("sinkhorn", SinkhornCoupler),
                                        ("independent", IndependentCoupler)])
def test_coupler_named_as_torchcfm_users_write_it(name, kind):
    """coupler="exact" (torchcfm's ot_method spelling) builds that coupler with its defaults; the
    exact one pairs like ExactOTCoupler() itself."""
    m = ConditionalFlowMatcher(coupler=name)
    assert type(m.coupler) is kind and set(COUPLERS) == {"exact", "sinkhorn", "independent"}
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g) + 2
    s = m.sample(x0, x1, t=0.0, generator=torch.Generator().manual_seed(0))
    if name == "exact":
        torch.testing.assert_close(s.x1, ExactOTCoupler().pair(x0, x1)[1], rtol=0, atol=0)
    assert sorted_rows(s.x0) == sorted_rows(x0)


@pytest.mark.parametrize("bad, match", [
    ("Exact", r"one of the names \['exact', 'independent', 'sinkhorn'\], got 'Exact'"),
    (ExactOTCoupler, r"got the class ExactOTCoupler; pass ExactOTCoupler\(\) instead"),
    (lambda x0, x1: (x0, x1), "a Coupler instance"),
])
def test_anything_else_as_coupler_is_refused_naming_what_is_accepted(bad, match):
    with pytest.raises(ValueError, match=match):
        ConditionalFlowMatcher(coupler=bad)


@pytest.mark.parametrize("sigma", [0.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_default_path_gives_bitwise_the_straight_interpolant(sigma, dtype):
    """The default matcher (StraightPath(sigma)) returns bit for bit x_t = t x1 + (1 - t) x0 + sigma eps and
    u_t = x1 - x0, with t and eps drawn in that order from the generator, as before paths existed."""
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(32, 3, generator=g, dtype=dtype), torch.randn(32, 3, generator=g, dtype=dtype)
    s = ConditionalFlowMatcher(sigma=sigma).sample(x0, x1, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    t = torch.rand(32, generator=g, dtype=dtype)
    eps = torch.randn(32, 3, generator=g, dtype=dtype)
    assert torch.equal(s.t, t) and torch.equal(s.noise, eps)
    assert torch.equal(s.x_t, t[:, None] * x1 + (1 - t[:, None]) * x0 + sigma * eps)
    assert torch.equal(s.u_t, x1 - x0)


def test_guided_sample_carries_labels_with_their_points():
    """torchcfm's guided signature: after exact OT re-pairing each returned label is still the label of its
    returned point (labels here encode the point's row), and the output follows return_noise."""
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(24, 2, generator=g), torch.randn(24, 2, generator=g) + 3
    y0, y1 = torch.arange(24), torch.arange(100, 124)
    m = OTConditionalFlowMatcher()
    t, xt, ut, a, b = m.guided_sample_location_and_conditional_flow(x0, x1, y0, y1, t=torch.zeros(24))
    assert torch.equal(xt, x0[a])
    torch.testing.assert_close(xt + ut, x1[b - 100])
    assert not torch.equal(b, y1)  # the coupling did move the targets
    out = m.guided_sample_location_and_conditional_flow(x0, x1, y1=y1, return_noise=True)
    assert len(out) == 6 and out[3] is None and out[5].shape == x0.shape
