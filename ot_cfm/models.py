"""Vector-field models v(t, x): an MLP for vectors and torchcfm's UNet for images."""

from __future__ import annotations

import math

import torch
from torch import nn

from ot_cfm.validation import as_time_tensor

__all__ = ["ACTIVATIONS", "MLP", "SinusoidalTimeEmbedding", "unet"]

#: activation name -> module class, the choices of ``MLP(activation=...)``
ACTIVATIONS = {"selu": nn.SELU, "relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh, "elu": nn.ELU}


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


class MLP(nn.Module):
    """v(t, x) for x of shape (B, *shape), flattened to (B, dim); t a float or a (B,) tensor.

    Architecture: [x, emb(t)] -> depth x (Linear, activation) -> Linear(dim). With the defaults
    (width 64, depth 3, SELU, time concatenated) it is torchcfm's ``MLP(dim, w=64, time_varying=True)``.

    Args:
        dim: number of coordinates of one (flattened) sample.
        width: hidden width.  depth: number of hidden layers.  activation: one of selu, relu, silu, gelu, tanh, elu.
        time_embedding: "concat" (t as one extra input) or "sinusoidal" (``time_features`` Fourier features).
    """

    def __init__(self, dim: int, width: int = 64, depth: int = 3, activation: str = "selu",
                 time_embedding: str = "concat", time_features: int = 16):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if depth < 1 or width < 1 or dim < 1:
            raise ValueError(f"dim, width and depth must be positive, got dim={dim}, width={width}, depth={depth}")
        if time_embedding == "concat":
            self.time_embedding, t_dim = None, 1
        elif time_embedding == "sinusoidal":
            self.time_embedding, t_dim = SinusoidalTimeEmbedding(time_features), time_features
        else:
            raise ValueError(f"time_embedding must be 'concat' or 'sinusoidal', got {time_embedding!r}")
        self.dim = dim
        layers: list[nn.Module] = []
        in_features = dim + t_dim
        for _ in range(depth):
            layers += [nn.Linear(in_features, width), ACTIVATIONS[activation]()]
            in_features = width
        layers.append(nn.Linear(in_features, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"MLP built for {self.dim} coordinates got x of shape {tuple(x.shape)}")
        t = as_time_tensor(t, flat)
        emb = t[:, None] if self.time_embedding is None else self.time_embedding(t)
        return self.net(torch.cat([flat, emb], dim=1)).reshape(x.shape)


def unet(shape: tuple[int, int, int], channels: int = 32, res_blocks: int = 1, num_classes: int | None = None,
         **kwargs) -> nn.Module:
    """torchcfm's UNet for images of shape (C, H, W), called as ``model(t, x)`` like every field here."""
    from torchcfm.models.unet.unet import UNetModelWrapper

    return UNetModelWrapper(dim=tuple(shape), num_channels=channels, num_res_blocks=res_blocks,
                            num_classes=num_classes, class_cond=num_classes is not None, **kwargs)
