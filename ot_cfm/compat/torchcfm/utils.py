"""torchcfm's ``utils``: toy samplers, the torchdyn model wrapper and a trajectory plot.

The samplers make torchcfm's draws, in its order, from the global generators it uses (torch's for the
Gaussians; numpy's, through torchdyn's ``generate_moons``, for the moons), so equal seeds give equal data.
torchcfm's moons are evenly spaced points on the two half circles shifted along the diagonal by one
uniform [0, 0.2) draw each, not scikit-learn's moons with Gaussian noise (``ot_cfm.data``'s "moons").
"""

from __future__ import annotations

import math

import torch
from torchdyn.datasets import generate_moons

from ot_cfm.evaluation.plotting import draw_trajectories

__all__ = ["eight_normal_sample", "sample_moons", "sample_8gaussians", "torch_wrapper", "plot_trajectories"]

#: torchcfm's eight centres, in its order (the order fixes which centre each multinomial draw picks)
_CENTRES = ((1, 0), (-1, 0), (0, 1), (0, -1), (1 / math.sqrt(2), 1 / math.sqrt(2)), (1 / math.sqrt(2), -1 / math.sqrt(2)),
            (-1 / math.sqrt(2), 1 / math.sqrt(2)), (-1 / math.sqrt(2), -1 / math.sqrt(2)))


def eight_normal_sample(n: int, dim: int, scale: float = 1, var: float = 1) -> torch.Tensor:
    """n points (n, dim), dim = 2: one of 8 centres on the circle of radius ``scale`` plus N(0, sqrt(var) I) noise
    (torchcfm's parametrisation: sqrt(var) is the covariance); noise first, then the centres, from torch's generator."""
    if dim != 2:
        raise ValueError(f"the eight centres are points of the plane: dim must be 2, got {dim}")
    noise = torch.distributions.MultivariateNormal(torch.zeros(dim), math.sqrt(var) * torch.eye(dim)).sample((n,))
    which = torch.multinomial(torch.ones(8), n, replacement=True)
    return (torch.tensor(_CENTRES, dtype=torch.float64) * scale)[which] + noise  # float64, as torchcfm's


def sample_moons(n: int) -> torch.Tensor:
    """n points (n, 2): torchdyn's moons (evenly spaced, one uniform diagonal shift of up to 0.2 each) mapped by 3 x - 1."""
    return generate_moons(n, noise=0.2)[0] * 3 - 1


def sample_8gaussians(n: int) -> torch.Tensor:
    """n points (n, 2), float32: ``eight_normal_sample(n, 2, scale=5, var=0.1)``."""
    return eight_normal_sample(n, 2, scale=5, var=0.1).float()


class torch_wrapper(torch.nn.Module):  # torchcfm's name, kept
    """A model of [x, t] (torchcfm's ``MLP(..., time_varying=True)``) as torchdyn's field f(t, x)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, t: torch.Tensor, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.model(torch.cat([x, t.reshape(-1).expand(x.shape[0])[:, None].to(x.dtype)], 1))


def plot_trajectories(traj: torch.Tensor):
    """Figure of trajectories (K, B, 2) (at most 2000 of them): start points, paths and end points, labelled;
    returns the matplotlib figure (torchcfm's shows it instead)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    draw_trajectories(ax, torch.as_tensor(traj)[:, :2000])
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title("trajectories")
    return fig
