"""The MLP field for vectors (B, d), optionally class-conditional; its layer stack is torchcfm's MLP."""

from __future__ import annotations

import math

import torch
from torch import nn

from ot_cfm.models.field import FieldModel, check_label_args, labels_for
from ot_cfm.utils.validation import as_time_tensor

__all__ = ["ACTIVATIONS", "mlp_layers", "MLP", "SinusoidalTimeEmbedding"]


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


class MLP(FieldModel):
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
        check_label_args(num_classes)
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
        labels = labels_for(self, y, x)
        parts = [flat, t[:, None] if self.time_embedding is None else self.time_embedding(t)]
        if labels is not None:
            parts.append(self.label_embedding(labels).to(flat.dtype))
        return self.net(torch.cat(parts, dim=1)).reshape(x.shape)
