"""torchcfm's UNet for images under the model contract, with presets by image size.

torchcfm's UNet is the guided-diffusion UNet: residual blocks with GroupNorm of 32 groups, self-attention
at chosen feature-map sizes and in the middle block, the time and the label entering through an embedding
added in every block. ``unet_for(shape)`` picks a preset by image size (``UNET_PRESETS``): 8x8 (digits, small
enough to train on a CPU in minutes), 28x28 (MNIST, torchcfm's MNIST example) and 32x32 (CIFAR-10, torchcfm's
CIFAR-10 training script).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ot_cfm.models.field import FieldModel, check_label_args, labels_for
from ot_cfm.utils.validation import as_time_tensor

__all__ = ["UNet", "UNetPreset", "UNET_PRESETS", "unet_for", "unet"]


# torchcfm's UNet normalises with GroupNorm(32, channels): every feature-map width must be a multiple of 32
_GROUPS = 32



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


class UNet(FieldModel):
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
        check_label_args(num_classes)
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
        return self.net(t, x, y=labels_for(self, y, x))


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
