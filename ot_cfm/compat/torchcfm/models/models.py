"""torchcfm's ``models.models``: the MLP of [x, t] and the gradient model, on ot-cfm's layer stack."""

from __future__ import annotations

import torch

from ot_cfm.models import mlp_layers

__all__ = ["MLP", "GradModel"]


class MLP(torch.nn.Module):
    """torchcfm's MLP: f(z) for z of shape (B, dim + 1) = [x, t] when ``time_varying`` (else (B, dim)), three
    hidden layers of width w with SELU, output (B, out_dim) (out_dim = dim by default). Same layers and
    parameter names as torchcfm's (``net.0`` ... ``net.6``), so its checkpoints load. ot-cfm's own
    ``ot_cfm.MLP`` is the same network called as ``model(t, x)``."""

    def __init__(self, dim: int, out_dim: int | None = None, w: int = 64, time_varying: bool = False):
        super().__init__()
        self.time_varying = time_varying
        self.net = mlp_layers(dim + (1 if time_varying else 0), w, 3, "selu", dim if out_dim is None else out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GradModel(torch.nn.Module):
    """The gradient of a scalar ``action`` of z = [x, t] with respect to x: grad_x sum(action(z)), (B, dim)."""

    def __init__(self, action: torch.nn.Module):
        super().__init__()
        self.action = action

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.requires_grad_(True)
        grad = torch.autograd.grad(torch.sum(self.action(x)), x, create_graph=True)[0]
        return grad[:, :-1]
