"""Models: the UNet presets, the model contract (t forms, labels, the null label), guidance and rebuilding."""

import json

import pytest
import torch

from ot_cfm.models import (
    MLP,
    UNET_PRESETS,
    UNet,
    as_label_tensor,
    drop_labels,
    guided_field,
    is_conditional,
    model_from_config,
    unet,
    unet_for,
)
from ot_cfm.solvers.ode import sample

# the smallest UNet widths torchcfm allows (GroupNorm with 32 groups), so forward passes stay fast
TINY = {"digits": dict(channels=32), "mnist": dict(channels=32, channel_mult=(1, 2)),
        "cifar10": dict(channels=32, res_blocks=1, channel_mult=(1, 2), num_head_channels=32)}
SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """torchcfm zero-initialises every residual branch's last convolution and the output convolution, so an
    untrained UNet returns zeros for every input; random weights make inputs and labels matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_real_presets_follow_torchcfm_examples_and_have_the_expected_sizes():
    # parameters of each real preset (unconditional): 8x8 ~0.70M, 28x28 ~1.08M, 32x32 ~35.7M
    # (torchcfm's CIFAR-10 script prints its UNet as 34.1 "M" parameters, counted in units of 2**20)
    expected = {"digits": (0.6e6, 0.8e6), "mnist": (1.0e6, 1.2e6), "cifar10": (34e6, 37e6)}
    for name, shape in SHAPES.items():
        model = unet_for(shape)
        low, high = expected[name]
        assert low < _n_params(model) < high, (name, _n_params(model))
        assert model.config["channels"] == UNET_PRESETS[name].channels and model.num_classes is None
    cifar = unet_for((3, 32, 32)).net
    assert cifar.model_channels == 128 and cifar.num_res_blocks == 2 and tuple(cifar.channel_mult) == (1, 2, 2, 2)
    assert cifar.attention_resolutions == (2,) and cifar.dropout == 0.1  # attention at 32 / 2 = 16 pixels
    mnist = unet_for((1, 28, 28)).net
    assert mnist.model_channels == 32 and tuple(mnist.channel_mult) == (1, 2, 2) and mnist.attention_resolutions == (1,)
    # a conditional preset adds an embedding of num_classes + 1 rows (the last is the null label)
    cond = unet_for((1, 28, 28), num_classes=10)
    assert cond.net.label_emb.num_embeddings == 11 and cond.null_label == 10 and is_conditional(cond)


def test_the_digits_preset_runs_forward_and_backward():
    model = unet_for((1, 8, 8), num_classes=10)
    x = torch.randn(4, 1, 8, 8)
    v = model(torch.rand(4), x, torch.tensor([0, 3, 9, 10]))
    assert v.shape == x.shape
    v.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("num_classes", [None, 10])
def test_each_preset_maps_images_to_images_of_the_same_shape(name, num_classes):
    shape = SHAPES[name]
    model = _perturb(unet_for(shape, num_classes=num_classes, **TINY[name]))
    x = torch.randn(3, *shape)
    args = () if num_classes is None else (torch.tensor([1, 2, 10]),)
    v = model(torch.rand(3), x, *args)
    assert v.shape == x.shape and v.dtype == x.dtype and torch.isfinite(v).all()


def test_preset_chosen_by_name_and_for_rgb_and_grey_images():
    assert unet_for((3, 8, 8), **TINY["digits"]).shape == (3, 8, 8)
    # the 8x8 settings for 16x16 images: attention sizes are pixels, so they are given anew
    with pytest.raises(ValueError, match=r"feature-map sizes of this UNet, \[16, 8\].*got \(4,\)"):
        unet_for((1, 16, 16), preset="digits")
    model = unet_for((1, 16, 16), preset="digits", attention=(8,))
    assert model.shape == (1, 16, 16) and model.config["attention"] == [8]
    assert model(0.5, torch.randn(2, 1, 16, 16)).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("model", [
    pytest.param(lambda: _perturb(unet_for((1, 8, 8), num_classes=3)), id="unet"),
    pytest.param(lambda: MLP(6, width=16, depth=2, num_classes=3), id="mlp"),
])
def test_time_as_float_0d_one_element_and_batch_gives_the_same_field(model):
    model = model()
    x = torch.randn(4, 1, 8, 8) if isinstance(model, UNet) else torch.randn(4, 6)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        ref = model(torch.full((4,), 0.3), x, y)
        for t in (0.3, torch.tensor(0.3), torch.tensor([0.3])):
            assert torch.allclose(model(t, x, y), ref, atol=1e-6)
        per_sample = model(torch.tensor([0.1, 0.3, 0.5, 0.9]), x, y)
    assert torch.allclose(per_sample[1], ref[1], atol=1e-6) and not torch.allclose(per_sample[0], ref[0])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        model(torch.rand(3), x, y)


@pytest.mark.parametrize("model", [
    pytest.param(lambda: _perturb(unet_for((1, 8, 8), num_classes=3)), id="unet"),
    pytest.param(lambda: MLP(6, width=16, depth=2, num_classes=3), id="mlp"),
])
def test_conditional_models_answer_each_label_and_the_null_label_differently(model):
    model = model()
    x = torch.randn(1, 1, 8, 8) if isinstance(model, UNet) else torch.randn(1, 6)
    with torch.no_grad():
        outs = [model(0.5, x, torch.tensor([k])) for k in range(4)]  # 3 = the null label
        assert torch.equal(model(0.5, x, 2), outs[2])  # one int labels the whole batch
    for i in range(4):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-4, (i, j)


@pytest.mark.parametrize("model", [
    pytest.param(lambda: unet_for((1, 8, 8), num_classes=3), id="unet"),
    pytest.param(lambda: MLP(64, width=8, depth=1, num_classes=3), id="mlp"),
])
def test_labels_out_of_range_of_the_wrong_type_or_shape_or_missing_are_refused(model):
    model = model()
    x = torch.randn(2, 1, 8, 8)
    for bad in (torch.tensor([0, 4]), torch.tensor([-1, 0]), 7):
        with pytest.raises(ValueError, match=r"0 \.\. 2 \(classes\) or be 3 \(the null label"):
            model(0.5, x, bad)
    with pytest.raises(ValueError, match="integer tensor"):
        model(0.5, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="booleans"):
        model(0.5, x, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        model(0.5, x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"class-conditional \(num_classes=3\).*model\(t, x, y\)"):
        model(0.5, x)


def test_unconditional_models_refuse_labels_and_keep_their_parameters():
    with pytest.raises(ValueError, match="unconditional"):
        unet_for((1, 8, 8))(0.5, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    mlp = MLP(2)
    with pytest.raises(ValueError, match="unconditional"):
        mlp(0.5, torch.randn(2, 2), 0)
    # the unconditional MLP is unchanged, so checkpoints written before labels existed still load
    assert sorted(mlp.state_dict()) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight",
                                        "net.4.bias", "net.4.weight", "net.6.bias", "net.6.weight"]
    assert not is_conditional(mlp) and mlp.null_label is None and not is_conditional(torch.nn.Linear(2, 2))


def test_unsupported_shapes_and_settings_get_errors_naming_what_is_supported():
    with pytest.raises(ValueError, match=r"\(1, 16, 16\).*\(C, 8, 8\) \[digits\].*\(C, 28, 28\) \[mnist\].*"
                                         r"\(C, 32, 32\) \[cifar10\].*preset=.*UNet\(shape"):
        unet_for((1, 16, 16))
    with pytest.raises(ValueError, match="no UNet preset"):
        unet_for((3, 32, 28))
    with pytest.raises(ValueError, match=r"unknown UNet preset 'imagenet'.*cifar10"):
        unet_for((3, 32, 32), preset="imagenet")
    with pytest.raises(ValueError, match=r"unknown UNet settings \['width'\]"):
        unet_for((1, 8, 8), width=8)
    with pytest.raises(ValueError, match=r"multiple of 32.*channels=16"):
        unet_for((1, 8, 8), channels=16)
    with pytest.raises(ValueError, match=r"attention sizes .* \[8, 4\].*got \(2,\)"):
        unet_for((1, 8, 8), attention=(2,))
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet((1, 10, 10), channels=32, res_blocks=1, channel_mult=(1, 1, 1))
    with pytest.raises(ValueError, match="num_classes must be None"):
        unet_for((1, 8, 8), num_classes=0)
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\) got x of shape \(2, 3, 8, 8\)"):
        unet_for((1, 8, 8))(0.5, torch.randn(2, 3, 8, 8))


def test_guidance_scale_zero_is_the_unconditional_field_and_one_the_conditional_field():
    for model in (_perturb(unet_for((1, 8, 8), num_classes=3)), MLP(64, width=16, depth=2, num_classes=3)):
        x = torch.randn(4, 1, 8, 8)
        y = torch.tensor([0, 1, 2, 1])
        t = torch.tensor(0.4)
        with torch.no_grad():
            v_cond, v_uncond = model(t, x, y), model(t, x, model.null_label)
            assert torch.equal(guided_field(model, y, 0.0)(t, x), v_uncond)
            assert torch.equal(guided_field(model, y, 1.0)(t, x), v_cond)
            assert not torch.allclose(v_cond, v_uncond)
            guided = guided_field(model, y, 2.5)(t, x)  # both halves in one call on a doubled batch
            assert torch.allclose(guided, v_uncond + 2.5 * (v_cond - v_uncond), atol=1e-5)
            assert torch.equal(guided_field(model, 1, 1.0)(t, x), model(t, x, torch.ones(4, dtype=torch.long)))


def test_guided_field_plugs_into_the_sampler_and_refuses_unconditional_models():
    model = _perturb(unet_for((1, 8, 8), num_classes=3))
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        result = sample(guided_field(model, torch.tensor([0, 1, 2]), 2.0), x0, solver="euler", steps=2)
    assert result.x.shape == x0.shape and result.nfe == 2
    with pytest.raises(ValueError, match="class-conditional model"):
        guided_field(unet_for((1, 8, 8)), 0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        guided_field(model, 0, float("nan"))


def test_config_rebuilds_the_same_network_and_is_storable():
    for model in (_perturb(unet_for((1, 8, 8), num_classes=3)), MLP(64, width=16, depth=2, num_classes=3,
                                                                    time_embedding="sinusoidal")):
        config = json.loads(json.dumps(model.config))
        twin = model_from_config(config).eval()
        twin.load_state_dict(model.state_dict())
        x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 3])
        with torch.no_grad():
            assert torch.equal(twin(0.5, x, y), model(0.5, x, y))
    with pytest.raises(ValueError, match="kind 'mlp', 'unet' or 'flow_and_score'"):
        model_from_config({"kind": "resnet"})


def test_label_dropout_uses_the_null_label_and_the_given_generator():
    y = torch.arange(10).repeat(100)
    assert torch.equal(drop_labels(y, 0.0, 10), y)
    assert (drop_labels(y, 1.0, 10) == 10).all()
    a = drop_labels(y, 0.3, 10, torch.Generator().manual_seed(5))
    b = drop_labels(y, 0.3, 10, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and 200 < (a == 10).sum() < 400 and torch.equal(a[a != 10], y[a != 10])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_labels(y, 1.5, 10)
    assert torch.equal(as_label_tensor(torch.tensor([1, 2], dtype=torch.int32), torch.zeros(2, 1), 3),
                       torch.tensor([1, 2]))


def test_unet_with_torchcfm_defaults_still_builds_the_examples_networks():
    small = unet((1, 8, 8), channels=32, res_blocks=1, channel_mult=(1,))
    assert small.config["attention"] == [] and small(0.5, torch.randn(2, 1, 8, 8)).shape == (2, 1, 8, 8)
    assert unet((1, 28, 28)).config["attention"] == [28] and unet((3, 32, 32)).config["attention"] == [16]
    with pytest.raises(ValueError, match="no default channel_mult"):
        unet((1, 8, 8))
