"""Vector-field models v(t, x): an MLP for vectors and torchcfm's UNet for images, both optionally class-conditional.

The model contract (every field of this package, learned or exact, follows it):

- ``model(t, x)`` with ``t`` a float, a 0-d or one-element tensor (as ODE solvers pass it) or a (B,) tensor, and
  ``x`` of shape (B, *shape), returns the velocity, of shape (B, *shape).
- A class-conditional model has an integer attribute ``num_classes`` (K) and is called ``model(t, x, y)`` with
  ``y`` an integer tensor of shape (B,) (or one int for the whole batch) holding labels in 0 .. K. The label
  ``K`` (the attribute ``null_label``) is reserved: it means "no class", the unconditional field, and is what
  label dropout substitutes during training so that one network learns both fields. The label embedding
  therefore has K + 1 rows. ``is_conditional(model)`` tells the two kinds apart (``num_classes`` is None or
  absent on an unconditional model); a conditional model called without ``y``, or an unconditional one called
  with it, raises ``ValueError``.
- ``guided_field(model, y, scale)`` turns a conditional model into a field(t, x) for ``ot_cfm.sampling.sample``
  with classifier-free guidance: v = v(t, x, null) + scale (v(t, x, y) - v(t, x, null)) (Ho and Salimans,
  "Classifier-free diffusion guidance", 2022; Zheng et al., "Guided flows for generative modeling and decision
  making", 2023, for flow matching).

Images use torchcfm's UNet (the guided-diffusion UNet: residual blocks with GroupNorm of 32 groups, self-attention
at chosen feature-map sizes and in the middle block, the time and the label entering through an embedding
added in every block). ``unet_for(shape)`` picks a preset by image size (``UNET_PRESETS``): 8x8 (digits, small
enough to train on a CPU in minutes), 28x28 (MNIST, torchcfm's MNIST example) and 32x32 (CIFAR-10, torchcfm's
CIFAR-10 training script).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from ot_cfm.validation import as_time_tensor

__all__ = ["ACTIVATIONS", "mlp_layers", "MLP", "SinusoidalTimeEmbedding", "UNet", "UNetPreset", "UNET_PRESETS", "unet_for",
           "unet", "is_conditional", "has_score", "FlowAndScore", "as_label_tensor", "drop_labels", "guided_field",
           "model_from_config"]

#: activation name -> module class, the choices of ``MLP(activation=...)``
ACTIVATIONS = {"selu": nn.SELU, "relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh, "elu": nn.ELU}

# torchcfm's UNet normalises with GroupNorm(32, channels): every feature-map width must be a multiple of 32
_GROUPS = 32


def is_conditional(model) -> bool:
    """True when ``model`` is class-conditional (called ``model(t, x, y)``), i.e. has a ``num_classes`` set."""
    return getattr(model, "num_classes", None) is not None


def has_score(model) -> bool:
    """True when ``model`` has a score head: a callable ``model.score(t, x)`` (``model.score(t, x, y)`` when
    conditional) estimating grad_x log p_t(x), as ``FlowAndScore`` has."""
    return callable(getattr(model, "score", None))


def as_label_tensor(y, like: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Turn one int or an integer tensor of shape (B,) into int64 labels of shape (B,) on ``like``'s device,
    checking that each lies in 0 .. num_classes (``num_classes`` itself being the null, unconditional label)."""
    batch = like.shape[0]
    if isinstance(y, bool) or (isinstance(y, torch.Tensor) and y.dtype == torch.bool):
        raise ValueError("y must hold integer class labels, got booleans")
    if isinstance(y, int):
        y = torch.full((batch,), y, dtype=torch.long, device=like.device)
    elif isinstance(y, torch.Tensor):
        if y.is_floating_point() or y.is_complex():
            raise ValueError(f"y must be an integer tensor of class labels, got dtype {y.dtype}")
        if y.shape != (batch,):
            raise ValueError(f"y must be one int or a tensor of shape ({batch},) (one label per sample of x), "
                             f"got shape {tuple(y.shape)}")
        y = y.to(device=like.device, dtype=torch.long)
    else:
        raise ValueError(f"y must be an int or an integer tensor of shape ({batch},), got {type(y).__name__}")
    bad = (y < 0) | (y > num_classes)
    if bad.any():
        raise ValueError(f"labels must lie in 0 .. {num_classes - 1} (classes) or be {num_classes} (the null label, "
                         f"unconditional), got {y[bad][:5].tolist()}")
    return y


def _check_label_args(num_classes: int | None) -> None:
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be None (unconditional) or an int >= 1, got {num_classes!r}")


def _labels_for(model: nn.Module, y, x: torch.Tensor) -> torch.Tensor | None:
    """The forward passes' shared check: labels exactly when the model is conditional."""
    name = type(model).__name__
    if model.num_classes is None:
        if y is not None:
            raise ValueError(f"this {name} is unconditional (num_classes=None) but was given labels y; "
                             "call it as model(t, x) or build it with num_classes")
        return None
    if y is None:
        raise ValueError(f"this {name} is class-conditional (num_classes={model.num_classes}): call it as "
                         f"model(t, x, y); y = {model.null_label} (the null label) gives the unconditional field")
    return as_label_tensor(y, x, model.num_classes)


def drop_labels(y: torch.Tensor, probability: float, null_label: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each label becomes ``null_label`` with ``probability``.

    The draw uses ``generator`` (on y's device), never the global generator when one is given.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {probability}")
    if probability == 0.0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < probability
    return torch.where(drop, torch.full_like(y, null_label), y)


class SinusoidalTimeEmbedding(nn.Module):
    """t (B,) -> (B, features): [sin(2 pi f_k t), cos(2 pi f_k t)] with log-spaced f_k in [1, max_frequency]."""

    def __init__(self, features: int = 16, max_frequency: float = 64.0):
        super().__init__()
        if features % 2:
            raise ValueError(f"features must be even, got {features}")
        freqs = torch.exp(torch.linspace(0.0, math.log(max_frequency), features // 2))
        self.register_buffer("freqs", 2 * math.pi * freqs)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.freqs.to(t.dtype)
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class _FieldModel(nn.Module):
    """What MLP and UNet share: ``num_classes`` (None: unconditional) and the constructor's ``_config``."""

    num_classes: int | None
    _config: dict

    @property
    def null_label(self) -> int | None:
        """The label meaning "unconditional" (``num_classes``); None for an unconditional model."""
        return self.num_classes

    @property
    def config(self) -> dict:
        """The constructor's arguments plus ``kind``: ``model_from_config(model.config)`` builds the same network."""
        return dict(self._config)


def mlp_layers(in_features: int, width: int, depth: int, activation: str, out_features: int) -> nn.Sequential:
    """Linear(in_features, width), activation, (depth - 1) x (Linear(width, width), activation), Linear(width,
    out_features): the layer stack of ``MLP`` and of torchcfm's MLP (``ot_cfm.compat.torchcfm``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if min(in_features, width, depth, out_features) < 1:
        raise ValueError(f"in_features, width, depth and out_features must be positive, got {in_features}, {width}, "
                         f"{depth}, {out_features}")
    layers: list[nn.Module] = []
    for k in range(depth):
        layers += [nn.Linear(in_features if k == 0 else width, width), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class MLP(_FieldModel):
    """v(t, x) or v(t, x, y) for x of shape (B, *shape), flattened to (B, dim); t a float or a (B,) tensor.

    Architecture: [x, emb(t)(, emb(y))] -> depth x (Linear, activation) -> Linear(dim). With the defaults
    (width 64, depth 3, SELU, time concatenated, unconditional) it is torchcfm's ``MLP(dim, w=64, time_varying=True)``.

    Args:
        dim: number of coordinates of one (flattened) sample.
        width: hidden width.  depth: number of hidden layers.  activation: one of selu, relu, silu, gelu, tanh, elu.
        time_embedding: "concat" (t as one extra input) or "sinusoidal" (``time_features`` Fourier features).
        num_classes: None (unconditional) or K: the model is then called ``model(t, x, y)`` with labels in 0 .. K,
            K being the null (unconditional) label; a learned embedding of K + 1 rows and ``class_features``
            columns is concatenated to the input.
    """

    def __init__(self, dim: int, width: int = 64, depth: int = 3, activation: str = "selu",
                 time_embedding: str = "concat", time_features: int = 16, num_classes: int | None = None,
                 class_features: int = 16):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if depth < 1 or width < 1 or dim < 1:
            raise ValueError(f"dim, width and depth must be positive, got dim={dim}, width={width}, depth={depth}")
        _check_label_args(num_classes)
        if num_classes is not None and class_features < 1:
            raise ValueError(f"class_features must be positive, got {class_features}")
        if time_embedding == "concat":
            self.time_embedding, t_dim = None, 1
        elif time_embedding == "sinusoidal":
            self.time_embedding, t_dim = SinusoidalTimeEmbedding(time_features), time_features
        else:
            raise ValueError(f"time_embedding must be 'concat' or 'sinusoidal', got {time_embedding!r}")
        self.dim, self.num_classes = dim, num_classes
        self._config = dict(kind="mlp", dim=dim, width=width, depth=depth, activation=activation,
                            time_embedding=time_embedding, time_features=time_features, num_classes=num_classes,
                            class_features=class_features)
        if num_classes is not None:
            self.label_embedding = nn.Embedding(num_classes + 1, class_features)
        self.net = mlp_layers(dim + t_dim + (class_features if num_classes is not None else 0), width, depth, activation,
                              dim)

    def forward(self, t: torch.Tensor | float, x: torch.Tensor, y: torch.Tensor | int | None = None) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"MLP built for {self.dim} coordinates got x of shape {tuple(x.shape)}")
        t = as_time_tensor(t, flat)
        labels = _labels_for(self, y, x)
        parts = [flat, t[:, None] if self.time_embedding is None else self.time_embedding(t)]
        if labels is not None:
            parts.append(self.label_embedding(labels).to(flat.dtype))
        return self.net(torch.cat(parts, dim=1)).reshape(x.shape)


@dataclass(frozen=True)
class UNetPreset:
    """Settings of torchcfm's UNet for one image size.

    Attributes:
        image_size: height = width of the images the preset is for.
        channels: base feature width (``model_channels``); level k has ``channels * channel_mult[k]``.
        res_blocks: residual blocks per level.
        channel_mult: width multiplier per level; each level after the first halves the feature map.
        attention: feature-map sizes (pixels, e.g. 16 for 16x16) with self-attention after each residual
            block; the middle block always has one.
        num_heads: attention heads, used when ``num_head_channels`` is -1.
        num_head_channels: channels per head (overrides ``num_heads``), or -1.
        dropout: dropout in the residual blocks.
        source: where the settings come from.
    """

    image_size: int
    channels: int
    res_blocks: int
    channel_mult: tuple[int, ...]
    attention: tuple[int, ...]
    num_heads: int = 1
    num_head_channels: int = -1
    dropout: float = 0.0
    source: str = ""


#: preset name -> settings. "mnist" and "cifar10" are the settings of torchcfm's own examples (its MNIST
#: notebooks and examples/images/cifar10/train_cifar10.py); torchcfm's ``attention_resolutions="16"`` means a
#: downsampling rate of image_size // 16, i.e. attention at 28x28 for MNIST and at 16x16 for CIFAR-10.
UNET_PRESETS: dict[str, UNetPreset] = {
    "digits": UNetPreset(8, channels=32, res_blocks=1, channel_mult=(1, 2), attention=(4,),
                         source="ot-cfm's small UNet for 8x8 digits: two levels (8x8, 4x4), trains on a CPU"),
    "mnist": UNetPreset(28, channels=32, res_blocks=1, channel_mult=(1, 2, 2), attention=(28,),
                        source="torchcfm's MNIST examples"),
    "cifar10": UNetPreset(32, channels=128, res_blocks=2, channel_mult=(1, 2, 2, 2), attention=(16,),
                          num_heads=4, num_head_channels=64, dropout=0.1,
                          source="torchcfm's CIFAR-10 training script"),
}
_PRESET_BY_SIZE = {p.image_size: name for name, p in UNET_PRESETS.items()}


class UNet(_FieldModel):
    """torchcfm's UNet (``torchcfm.models.unet.unet.UNetModel``, held as ``self.net``) under the model contract.

    ``model(t, x)`` or, with ``num_classes``, ``model(t, x, y)``: x (B, C, H, W) -> (B, C, H, W); t a float,
    a 0-d or one-element tensor or (B,). The time enters through torchcfm's sinusoidal embedding of t (t in
    [0, 1], as in torchcfm's examples); a label through a learned embedding of ``num_classes + 1`` rows (the last
    one, ``null_label``, is the unconditional label) added to the time embedding.

    Args:
        shape: (C, H, W) of one image.
        channels, res_blocks, channel_mult, attention, num_heads, num_head_channels, dropout: see ``UNetPreset``.
            Every ``channels * channel_mult[k]`` must be a multiple of 32 (torchcfm normalises with 32 groups).
        num_classes: None (unconditional) or the number K of classes.
        use_scale_shift_norm: torchcfm's FiLM-like conditioning in the residual blocks (off in its examples).
    """

    def __init__(self, shape: tuple[int, int, int], channels: int, res_blocks: int,
                 channel_mult: tuple[int, ...], attention: tuple[int, ...] = (), num_heads: int = 1,
                 num_head_channels: int = -1, dropout: float = 0.0, num_classes: int | None = None,
                 use_scale_shift_norm: bool = False):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (C, H, W) of positive sizes, got {shape}")
        _check_label_args(num_classes)
        channel_mult, attention = tuple(channel_mult), tuple(attention)
        if res_blocks < 1 or not channel_mult or any(not isinstance(m, int) or m < 1 for m in channel_mult):
            raise ValueError(f"res_blocks must be >= 1 and channel_mult a non-empty tuple of positive ints, "
                             f"got res_blocks={res_blocks}, channel_mult={channel_mult}")
        widths = [channels * m for m in channel_mult]
        if channels < 1 or any(w % _GROUPS for w in widths):
            raise ValueError(f"every level's width channels * channel_mult[k] must be a positive multiple of "
                             f"{_GROUPS} (torchcfm's GroupNorm has {_GROUPS} groups), got channels={channels}, "
                             f"channel_mult={channel_mult} -> widths {widths}")
        sizes = [shape[1] // 2**k for k in range(len(channel_mult))]
        if shape[1] % 2 ** (len(channel_mult) - 1) or shape[2] % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"{len(channel_mult)} levels halve the image {len(channel_mult) - 1} times: H and W "
                             f"must be divisible by {2 ** (len(channel_mult) - 1)}, got shape {shape}")
        if any(a not in sizes for a in attention):
            raise ValueError(f"attention sizes must be feature-map sizes of this UNet, {sizes} (H halved per "
                             f"level of channel_mult), got {attention}")
        attended = [w for w, size in zip(widths, sizes) if size in attention] + [widths[-1]]  # + middle block
        if num_head_channels != -1 and (num_head_channels < 1 or any(w % num_head_channels for w in attended)):
            raise ValueError(f"num_head_channels={num_head_channels} must be -1 or divide the width of every level "
                             f"with attention and of the middle block, {attended}")
        if num_head_channels == -1 and (num_heads < 1 or any(w % num_heads for w in attended)):
            raise ValueError(f"num_heads={num_heads} must divide the width of every level with attention and of "
                             f"the middle block, {attended}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        from torchcfm.models.unet.unet import UNetModel

        self.shape, self.num_classes = shape, num_classes
        self._config = dict(kind="unet", shape=list(shape), channels=channels, res_blocks=res_blocks,
                            channel_mult=list(channel_mult), attention=list(attention), num_heads=num_heads,
                            num_head_channels=num_head_channels, dropout=dropout, num_classes=num_classes,
                            use_scale_shift_norm=use_scale_shift_norm)
        self.net = UNetModel(image_size=shape[1], in_channels=shape[0], model_channels=channels,
                             out_channels=shape[0], num_res_blocks=res_blocks,
                             attention_resolutions=tuple(shape[1] // a for a in attention), dropout=dropout,
                             channel_mult=channel_mult, num_classes=None if num_classes is None else num_classes + 1,
                             num_heads=num_heads, num_head_channels=num_head_channels,
                             use_scale_shift_norm=use_scale_shift_norm)

    def forward(self, t: torch.Tensor | float, x: torch.Tensor, y: torch.Tensor | int | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != self.shape or x.shape[0] == 0:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UNet built for images of shape {self.shape} got x of shape {got}; expected (B, "
                             f"{', '.join(map(str, self.shape))}) with B >= 1")
        t = as_time_tensor(t, x)
        return self.net(t, x, y=_labels_for(self, y, x))


def unet_for(shape: tuple[int, int, int], *, num_classes: int | None = None, preset: str | None = None,
             **overrides) -> UNet:
    """torchcfm's UNet with the preset for images of ``shape`` = (C, H, W), chosen by H = W unless ``preset``
    names one of ``UNET_PRESETS``; ``overrides`` replace preset fields (e.g. ``channels=32``).

    Raises ValueError for an image size without a preset (naming the supported sizes), an unknown preset name
    or an unknown override.
    """
    shape = tuple(int(s) for s in shape)
    if preset is None:
        if len(shape) != 3 or shape[1] != shape[2] or shape[1] not in _PRESET_BY_SIZE:
            supported = ", ".join(f"(C, {s}, {s}) [{n}]" for s, n in sorted(_PRESET_BY_SIZE.items()))
            raise ValueError(f"no UNet preset for images of shape {shape}; presets exist for {supported}. For "
                             "other sizes pass preset=<name> with settings that fit, or build UNet(shape, "
                             "channels=..., res_blocks=..., channel_mult=..., attention=...) explicitly")
        preset = _PRESET_BY_SIZE[shape[1]]
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; expected one of {sorted(UNET_PRESETS)}")
    fields = {k: v for k, v in asdict(UNET_PRESETS[preset]).items() if k not in ("image_size", "source")}
    unknown = sorted(set(overrides) - set(fields) - {"use_scale_shift_norm"})
    if unknown:
        raise ValueError(f"unknown UNet settings {unknown}; expected some of {sorted(fields)} "
                         "or use_scale_shift_norm")
    fields.update(overrides)
    return UNet(shape, num_classes=num_classes, **fields)


def unet(shape: tuple[int, int, int], channels: int = 32, res_blocks: int = 1, num_classes: int | None = None,
         channel_mult: tuple[int, ...] | None = None, attention: tuple[int, ...] | None = None, **kwargs) -> UNet:
    """A UNet with explicit base settings and torchcfm's defaults for the rest: channel multipliers (1, 2, 2) at
    28x28 and (1, 2, 2, 2) at 32x32 (other sizes need ``channel_mult``), attention at 16x16 when the network
    has that feature-map size (28x28 at H = 28, torchcfm's reading of ``attention_resolutions="16"``)."""
    size = int(shape[-1])
    if channel_mult is None:
        defaults = {28: (1, 2, 2), 32: (1, 2, 2, 2)}
        if size not in defaults:
            raise ValueError(f"no default channel_mult for images of size {size}; pass channel_mult, "
                             "or use unet_for(shape) for the presets")
        channel_mult = defaults[size]
    if attention is None:
        rate = size // 16  # torchcfm's downsampling rate for attention_resolutions="16"; 0 below 16 pixels
        sizes = [size // 2**k for k in range(len(channel_mult))]
        attention = (size // rate,) if rate >= 1 and size // rate in sizes else ()
    return UNet(shape, channels=channels, res_blocks=res_blocks, channel_mult=channel_mult, attention=attention,
                num_classes=num_classes, **kwargs)


class FlowAndScore(nn.Module):
    """A flow network and a score network as one model (Schrodinger-bridge CFM, ``ot_cfm.sde``).

    ``model(t, x[, y])`` is the flow v(t, x), so the model samples like any other with ``ot_cfm.sampling.sample``;
    ``model.score(t, x[, y])`` estimates the score grad_x log p_t(x), (B, *shape), trained by the matcher's
    loss (its score term) and used by ``ot_cfm.sde.sample_sde`` as dx = [v + sigma^2 / 2 s] dt + sigma dW.

    Args:
        flow, score: models under the model contract (e.g. two ``MLP(dim)``), both unconditional or both
            conditional with the same ``num_classes``.
    """

    def __init__(self, flow: nn.Module, score: nn.Module):
        super().__init__()
        if getattr(flow, "num_classes", None) != getattr(score, "num_classes", None):
            raise ValueError(f"flow and score must take the same labels, got num_classes "
                             f"{getattr(flow, 'num_classes', None)} (flow) and {getattr(score, 'num_classes', None)} "
                             "(score)")
        self.flow_net, self.score_net = flow, score
        self.num_classes = getattr(flow, "num_classes", None)

    @property
    def null_label(self) -> int | None:
        """The label meaning "unconditional" (``num_classes``); None for an unconditional model."""
        return self.num_classes

    @property
    def config(self) -> dict:
        """kind "flow_and_score" with both networks' configs: ``model_from_config`` rebuilds it."""
        return dict(kind="flow_and_score", flow=self.flow_net.config, score=self.score_net.config)

    def forward(self, t: torch.Tensor | float, x: torch.Tensor, y: torch.Tensor | int | None = None) -> torch.Tensor:
        return self.flow_net(t, x) if y is None else self.flow_net(t, x, y)

    def score(self, t: torch.Tensor | float, x: torch.Tensor, y: torch.Tensor | int | None = None) -> torch.Tensor:
        """The score estimate s(t, x) ~ grad_x log p_t(x), x's shape."""
        return self.score_net(t, x) if y is None else self.score_net(t, x, y)


def model_from_config(config: dict) -> nn.Module:
    """Build an untrained MLP, UNet or FlowAndScore from ``model.config`` (a dict of plain values, storable in
    checkpoints)."""
    if not isinstance(config, dict) or config.get("kind") not in ("mlp", "unet", "flow_and_score"):
        raise ValueError(f"config must be a dict with kind 'mlp', 'unet' or 'flow_and_score' (a model's .config), "
                         f"got {config!r}")
    if config["kind"] == "flow_and_score":
        return FlowAndScore(model_from_config(config["flow"]), model_from_config(config["score"]))
    args = {k: v for k, v in config.items() if k != "kind"}
    if config["kind"] == "mlp":
        return MLP(**args)
    return UNet(**{**args, "shape": tuple(args["shape"]), "channel_mult": tuple(args["channel_mult"]),
                   "attention": tuple(args["attention"])})


class _GuidedField:
    def __init__(self, model: nn.Module, y, scale: float):
        self.model, self.y, self.scale = model, y, scale

    def __call__(self, t, x):
        m, s = self.model, self.scale
        if s == 1.0:
            return m(t, x, self.y)
        if s == 0.0:
            return m(t, x, m.null_label)
        y = as_label_tensor(self.y, x, m.num_classes)
        t = as_time_tensor(t, x)
        both = m(torch.cat([t, t]), torch.cat([x, x]), torch.cat([y, torch.full_like(y, m.null_label)]))
        v_cond, v_uncond = both.chunk(2)
        return (1.0 - s) * v_uncond + s * v_cond


def guided_field(model: nn.Module, y: torch.Tensor | int, scale: float = 1.0) -> Callable:
    """Classifier-free guidance: the field(t, x) = v(t, x, null) + scale (v(t, x, y) - v(t, x, null)).

    Computed as (1 - scale) v_uncond + scale v_cond, so scale 0 is exactly the unconditional field and scale 1
    exactly the conditional one (each then takes a single model call); other scales evaluate both halves in one
    call on a doubled batch. Scales above 1 sharpen the classes (typical values 1 to 3).

    Args:
        model: a conditional model (``is_conditional(model)``), such as ``MLP(..., num_classes=K)`` or ``UNet``.
        y: one int or labels of shape (B,) matching the batch the field will be called with; ``model.null_label``
            asks for the unconditional field.
        scale: guidance scale, a finite float.
    """
    if not is_conditional(model) or getattr(model, "null_label", None) is None:
        raise ValueError(f"guided_field needs a class-conditional model with a null label (num_classes set, e.g. "
                         f"MLP(..., num_classes=K) or unet_for(shape, num_classes=K)), got {type(model).__name__} "
                         f"with num_classes={getattr(model, 'num_classes', None)}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale}")
    return _GuidedField(model, y, scale)
