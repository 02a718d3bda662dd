"""Seeded data samplers: 2D toy distributions, scikit-learn's digits, tensors held in memory; arrays (N, d)
read from .npy / .npz / .csv files with a seeded held-out split (``load_array_dataset``).

Every sampler is a callable ``sampler(n, generator=None) -> (n, *shape)`` tensor (a labelled sampler,
``TensorSampler(data, labels, labelled=True)``, returns ``(x, y)`` with int64 labels y (n,)); all draws are
i.i.d. and go through the given ``torch.Generator`` (torch's default one when None).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["TOY_DATASETS", "sample_toy", "toy_sampler", "TensorSampler", "gaussian_sampler", "load_digits",
           "held_out_split", "ARRAY_SUFFIXES", "ArrayDataset", "load_array_dataset"]

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


# ---------------------------------------------------------------- arrays (N, d) from files

#: file endings that ``load_array_dataset`` reads
ARRAY_SUFFIXES = (".npy", ".npz", ".csv")
_DATA_KEYS = ("x", "data")
_LABEL_KEYS = ("y", "labels")


@dataclass(frozen=True)
class ArrayDataset:
    """Rows (N, d) of a file, split into training and held-out rows.

    ``train`` (N - M, d) and ``held_out`` (M, d) are float32, standardised when ``mean`` and ``std`` (d,)
    are set: x = (v - mean) / std, with mean and std those of all N rows (std 1 where a column is constant),
    so v = x std + mean maps back. Labels (int64) are None when the file has none.
    """

    name: str
    train: torch.Tensor
    held_out: torch.Tensor
    train_labels: torch.Tensor | None = None
    held_out_labels: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    @property
    def num_classes(self) -> int | None:
        """max label + 1 over both splits, or None without labels."""
        if self.train_labels is None:
            return None
        return int(torch.cat([self.train_labels, self.held_out_labels]).max()) + 1

    def train_sampler(self, *, labelled: bool = False) -> TensorSampler:
        """i.i.d. draws (with replacement) of training rows; with ``labelled`` each draw returns (x, y)."""
        return TensorSampler(self.train, self.train_labels, labelled=labelled)

    def held_out_sampler(self) -> TensorSampler:
        return TensorSampler(self.held_out)

    def to_original_units(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, d) in the file's units: x std + mean when standardised, else x itself."""
        return x if self.mean is None else x * self.std.to(x) + self.mean.to(x)


def _column_index(header: list[str] | None, column: str | int, width: int, path: Path) -> int:
    if isinstance(column, str) and not column.lstrip("-").isdigit():
        if header is None or column not in header:
            names = "no header row" if header is None else f"columns {header}"
            raise ValueError(f"{path}: no column named {column!r} ({names}); expected a header name or a column index")
        return header.index(column)
    index = int(column)
    if not -width <= index < width:
        raise ValueError(f"{path}: column index {index} out of range for {width} columns")
    return index % width


def _read_csv(path: Path, label_column: str | int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(features (N, d) float64, labels (N,) float64 or None) of a numeric CSV with an optional header row."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path}: empty; expected numeric rows (N, d), with an optional header row")

    def numeric(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False

    header = None
    if not all(numeric(cell) for cell in rows[0]):
        header, rows = [cell.strip() for cell in rows[0]], rows[1:]
    width = len(header) if header is not None else len(rows[0]) if rows else 0
    values = np.empty((len(rows), width))
    for line, row in enumerate(rows, start=2 if header is not None else 1):
        if len(row) != width:
            raise ValueError(f"{path}: line {line} has {len(row)} cells; expected {width} like the first row")
        for k, cell in enumerate(row):
            try:
                values[line - (2 if header is not None else 1), k] = float(cell)
            except ValueError:
                raise ValueError(f"{path}: line {line}, column {k + 1}: {cell!r} is not a number; expected numeric "
                                 "cells (only the first row may be a header)") from None
    if label_column is None:
        return values, None
    index = _column_index(header, label_column, width, path)
    return np.delete(values, index, axis=1), values[:, index]


def _read_arrays(path: Path, label_key: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(array, labels or None) as stored in a .npy or .npz file."""
    try:
        with open(path, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                if label_key is not None:
                    raise KeyError(f"a .npy file holds one array and no labels; --label-column {label_key!r} "
                                   "needs a .npz (labels under a key) or a .csv (a label column)")
                return loaded, None
            with loaded:
                keys = list(loaded.files)
                label_keys = (label_key,) if label_key is not None else _LABEL_KEYS
                found_label = next((k for k in label_keys if k in keys), None)
                if label_key is not None and found_label is None:
                    raise KeyError(f"arrays {keys} have no key {label_key!r} for the labels")
                data_keys = [k for k in _DATA_KEYS if k in keys] or [k for k in keys if k != found_label]
                if len(data_keys) != 1 and not (data_keys and data_keys[0] in _DATA_KEYS):
                    raise KeyError(f"arrays {keys}; expected the data under 'x' or 'data' (or as the only array "
                                   "besides the labels 'y' / 'labels')")
                return loaded[data_keys[0]], (loaded[found_label] if found_label else None)
    except KeyError as e:
        raise ValueError(f"{path}: {e.args[0]}") from None
    except Exception as e:  # numpy and zipfile fail on damaged files in many ways; each means the same here
        raise ValueError(f"{path}: not a readable .npy / .npz array file ({type(e).__name__}: {e}); expected an "
                         "array saved by numpy.save or numpy.savez, without pickled objects") from e


def _integer_labels(labels: np.ndarray, n: int, path: Path) -> torch.Tensor:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{path}: labels of shape {labels.shape}; expected one per row, shape ({n},)")
    if np.issubdtype(labels.dtype, np.floating):
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise ValueError(f"{path}: labels are not integers; expected class indices 0, 1, ...")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels of dtype {labels.dtype}; expected integers")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise ValueError(f"{path}: labels include {labels.min()}; expected class indices >= 0")
    return torch.from_numpy(labels)


def held_out_split(n: int, fraction: float, seed: int | torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): a permutation drawn from ``seed``, the last round(fraction n) held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held_out_fraction must lie in (0, 1), got {fraction}")
    held = round(fraction * n)
    if not 0 < held < n:
        raise ValueError(f"held_out_fraction {fraction} of {n} samples holds out {held}; expected between 1 and {n - 1}")
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator, device=generator.device).cpu()
    return order[: n - held], order[n - held:]


def load_array_dataset(path: str | os.PathLike, *, labels: str | int | None = None, standardize: bool = False,
                       held_out_fraction: float = 0.2, seed: int | torch.Generator = 0) -> ArrayDataset:
    """Read rows (N, d) from a ``.npy``, ``.npz`` or ``.csv`` file and split off held-out rows.

    - ``.npy``: one numeric array (N, d) (read with ``allow_pickle=False``, like ``.npz``).
    - ``.npz``: the data under ``x`` or ``data`` (or as the only array besides the labels); labels under
      ``y`` or ``labels`` when present, or under the key ``labels`` names.
    - ``.csv``: numeric cells, the first row optionally a header; ``labels`` names a column (by header name
      or index; negative indices count from the end), which is removed from the features.

    Labels must be integers >= 0 (floats with integer values are accepted). ``standardize`` maps every
    column to mean 0 and std 1 over all N rows (``ArrayDataset.to_original_units`` undoes it). The
    held-out rows are round(held_out_fraction N), at least one on each side, chosen by a permutation
    drawn from ``seed`` (an int, or a CPU ``torch.Generator``): the same seed gives the same split.
    Every fault raises an error naming the file and what was expected.
    """

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file; expected a .npy, .npz or .csv file "
                                "of rows (N, d)")
    suffix = path.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise ValueError(f"{path}: a file ending in {suffix!r}; expected one of {', '.join(ARRAY_SUFFIXES)}")
    if suffix == ".csv":
        array, raw_labels = _read_csv(path, labels)
    else:
        array, raw_labels = _read_arrays(path, None if labels is None else str(labels))
    if array.ndim != 2:
        raise ValueError(f"{path}: data of shape {array.shape}; expected a 2D array (N, d) of N rows")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            or array.dtype == np.bool_):
        raise ValueError(f"{path}: data of dtype {array.dtype}; expected numbers")
    if array.shape[0] < 2 or array.shape[1] < 1:
        raise ValueError(f"{path}: data of shape {array.shape}; expected at least 2 rows and 1 column")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        row = int(np.nonzero(~np.isfinite(values).all(axis=1))[0][0])
        raise ValueError(f"{path}: row {row} holds NaN or inf; expected finite numbers")
    label_tensor = None if raw_labels is None else _integer_labels(raw_labels, values.shape[0], path)
    data = torch.from_numpy(values)
    mean = std = None
    if standardize:
        mean, std = data.mean(dim=0), data.std(dim=0, correction=0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        data = (data - mean) / std
        mean, std = mean.float(), std.float()
    try:
        train, held = held_out_split(data.shape[0], held_out_fraction, seed)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    data = data.float()
    pick = (lambda rows: None) if label_tensor is None else (lambda rows: label_tensor[rows])
    return ArrayDataset(path.name, data[train], data[held], pick(train), pick(held), mean, std)
