"""Arrays (N, d) read from .npy / .npz / .csv files, with a seeded held-out split (``load_array_dataset``)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ot_cfm.data.toy import TensorSampler

__all__ = ["held_out_split", "ARRAY_SUFFIXES", "ArrayDataset", "load_array_dataset"]



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
