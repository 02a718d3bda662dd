"""Seeded samplers: 2D toy distributions, Gaussians of any shape, tensors held in memory, scikit-learn's digits.

Every sampler is a callable ``sampler(n, generator=None) -> (n, *shape)`` tensor (a labelled sampler,
``TensorSampler(data, labels, labelled=True)``, returns ``(x, y)`` with int64 labels y (n,)); all draws are
i.i.d. and go through the given ``torch.Generator`` (torch's default one when None).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch

__all__ = ["TOY_DATASETS", "sample_toy", "toy_sampler", "TensorSampler", "gaussian_sampler", "load_digits"]



Sampler = Callable[..., torch.Tensor]


def _gaussian(n, g):
    return torch.randn(n, 2, generator=g)


def _eight_gaussians(n, g):
    # torchcfm's geometry: centres on the circle of radius 5, isotropic cluster std 0.1 ** 0.25 (about 0.56).
    angles = torch.arange(8) * (math.pi / 4)
    centres = 5.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    which = torch.randint(0, 8, (n,), generator=g)
    return centres[which] + 0.1 ** 0.25 * torch.randn(n, 2, generator=g)


def _moons(n, g):
    # Two interleaved half circles with noise std 0.2, mapped by 3x - 1 like torchcfm's; positions are
    # drawn uniformly (scikit-learn's make_moons spaces them evenly, which is not i.i.d.).
    upper = torch.rand(n, generator=g) < 0.5
    theta = math.pi * torch.rand(n, generator=g)
    x = torch.where(upper, theta.cos(), 1 - theta.cos())
    y = torch.where(upper, theta.sin(), 0.5 - theta.sin())
    points = torch.stack([x, y], dim=1) + 0.2 * torch.randn(n, 2, generator=g)
    return 3 * points - 1


def _checkerboard(n, g):
    x = 4 * torch.rand(n, generator=g) - 2
    y = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g) + torch.floor(x) % 2
    return 2 * torch.stack([x, y], dim=1)


def _circles(n, g):
    radius = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 0.5)
    theta = 2 * math.pi * torch.rand(n, generator=g)
    points = radius[:, None] * torch.stack([theta.cos(), theta.sin()], dim=1)
    return 3 * (points + 0.08 * torch.randn(n, 2, generator=g))


def _swissroll(n, g):
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    points = torch.stack([t * t.cos(), t * t.sin()], dim=1) + torch.randn(n, 2, generator=g)
    return points / 5


# torchcfm's S curve (the two_dim data of its training runner; its package utils have none): scikit-learn's
# make_s_curve with noise 0.1, coordinates (x, z), every entry divided by the entries' standard deviation and
# multiplied by 7. The runner divides by each batch's own mean and std, so its draws are not i.i.d.; here
# the population values: mean 0 (x = sin t and z = sign(t) (cos t - 1) are odd in t ~ U(-3 pi / 2, 3 pi / 2))
# and variance (E x^2 + E z^2) / 2 = (1/2 + 0.01 + 3/2 + 4 / (3 pi) + 0.01) / 2 = 1.01 + 2 / (3 pi).
_SCURVE_NOISE = 0.1
_SCURVE_SCALE = 7.0 / math.sqrt(1.01 + 2 / (3 * math.pi))


def _scurve(n, g):
    from sklearn.datasets import make_s_curve  # lazy, like load_digits: importing scikit-learn takes a second

    # one seed per call from the generator: draws follow it, and successive draws are independent
    seed = int(torch.randint(0, 2**32, (), generator=g))
    points, _ = make_s_curve(n, noise=_SCURVE_NOISE, random_state=seed)
    return torch.from_numpy(points[:, [0, 2]] * _SCURVE_SCALE).float()


_TOYS = {"gaussian": _gaussian, "8gaussians": _eight_gaussians, "moons": _moons,
         "checkerboard": _checkerboard, "circles": _circles, "swissroll": _swissroll, "scurve": _scurve}
TOY_DATASETS = tuple(_TOYS)


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def sample_toy(name: str, n: int, generator: torch.Generator | None = None, *,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n i.i.d. points (n, 2) of the toy distribution ``name`` (one of TOY_DATASETS)."""
    if name not in _TOYS:
        raise ValueError(f"unknown toy dataset {name!r}; expected one of {TOY_DATASETS}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("toy samplers draw on the CPU: pass a CPU torch.Generator (results are moved to `device`)")
    return _TOYS[name](n, generator).to(device=device, dtype=dtype)


def toy_sampler(name: str, *, device=None, dtype: torch.dtype = torch.float32) -> Sampler:
    """A sampler ``(n, generator=None) -> (n, 2)`` for the toy distribution ``name``."""
    if name not in _TOYS:
        raise ValueError(f"unknown toy dataset {name!r}; expected one of {TOY_DATASETS}")
    return partial(sample_toy, name, device=device, dtype=dtype)


def _sample_gaussian(shape: tuple[int, ...], n: int, generator: torch.Generator | None = None, *,
                     device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n i.i.d. draws (n, *shape) of N(0, I), drawn on the generator's device and moved to ``device``."""
    return torch.randn((n, *shape), generator=generator, device=_generator_device(generator)).to(device=device, dtype=dtype)


def gaussian_sampler(shape: tuple[int, ...], *, device=None, dtype: torch.dtype = torch.float32) -> Sampler:
    """A sampler of N(0, I) in ``shape`` (the flow-matching source for images or any dimension); picklable,
    like every sampler here, so that worker processes can use it."""
    return partial(_sample_gaussian, tuple(shape), device=device, dtype=dtype)


class TensorSampler:
    """Draws i.i.d. rows (with replacement) of a dataset tensor (N, *shape).

    ``indices(n, generator)`` are the row numbers that ``__call__`` draws from the same generator state,
    so ``sampler.labels[indices]`` are the labels (N,) of those rows when labels were given.

    With ``labelled=True`` (labels required) the sampler returns ``(x, y)``: the rows (n, *shape) and their
    labels (n,), the same rows as without it for the same generator state. That is the labelled-sampler form
    the Trainer takes as a target for class-conditional training.
    """

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, *, labelled: bool = False):
        if data.shape[0] == 0:
            raise ValueError("data is empty; expected at least one sample")
        if labels is not None and labels.shape[0] != data.shape[0]:
            raise ValueError(f"labels ({labels.shape[0]}) and data ({data.shape[0]}) differ in length")
        if labelled and labels is None:
            raise ValueError("labelled=True returns (x, y) pairs and needs labels, one per row of data; got none")
        self.data, self.labels, self.labelled = data, labels, bool(labelled)

    def indices(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.data.shape[0], (n,), generator=generator).to(self.data.device)

    def __call__(self, n: int, generator: torch.Generator | None = None):
        rows = self.indices(n, generator)
        if self.labelled:
            return self.data[rows], self.labels[rows.to(self.labels.device)]
        return self.data[rows]


def load_digits(*, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten digits as images (1797, 1, 8, 8) scaled to [-1, 1], and labels (1797,)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=dtype).unsqueeze(1) / 8.0 - 1.0
    return images, torch.as_tensor(bunch.target, dtype=torch.long)
