"""Arrays (N, d) read from .npy / .npz / .csv files, with a seeded held-out split (``load_array_dataset``)."""

from __future__ import annotations

import csv
import math
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ot_cfm.data.toy import TensorSampler
from ot_cfm.utils.validation import check_class_array, check_seed

__all__ = ["held_out_split", "ARRAY_SUFFIXES", "ArrayDataset", "load_array_dataset", "NumpyFile", "read_at_most"]


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


def read_at_most(f, size: int) -> bytearray:
    """The next ``size`` bytes of the binary file ``f`` (fewer where it ends first), read 1 MiB at a time, so that
    the memory taken follows the bytes that are there, not the ``size`` a header announces."""
    data = bytearray()
    while len(data) < size:
        chunk = f.read(min(size - len(data), 1 << 20))
        if not chunk:
            break
        data += chunk
    return data


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _read_npy(f) -> np.ndarray:
    """The array of a .npy stream: its header's shape and dtype give the bytes to read, and those must follow."""
    version = np.lib.format.read_magic(f)
    if version not in _NPY_HEADERS:
        raise ValueError(f".npy format version {version[0]}.{version[1]}; expected 1.0 or 2.0")
    shape, fortran, dtype = _NPY_HEADERS[version](f)
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds pickled Python objects, which are not read (as numpy.load with "
                         "allow_pickle=False)")
    size = math.prod(shape) * dtype.itemsize
    data = read_at_most(f, size)
    if len(data) < size:
        raise ValueError(f"the header announces shape {shape} of {dtype}, {size} bytes, but {len(data)} follow")
    return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


class NumpyFile:
    """A .npy or .npz file open for reading, without pickles: ``keys`` (None for a .npy) and ``read(key)``.

    Each array's header (shape and dtype) is read first and its data read in chunks, so a header that
    announces more than the file holds is refused having taken memory only for the bytes that are there
    (``numpy.load`` allocates the announced array first). Damaged files raise a ValueError naming the file.
    """

    def __init__(self, path: Path):
        self.path, self._archive = path, None
        self._file = open(path, "rb")
        try:
            with _read_errors(path):
                if self._file.read(6) != b"\x93NUMPY":
                    self._file.seek(0)
                    self._archive = zipfile.ZipFile(self._file)
        except ValueError:
            self._file.close()
            raise
        names = [] if self._archive is None else self._archive.namelist()
        self._members = {name.removesuffix(".npy"): name for name in names}
        self.keys = None if self._archive is None else list(self._members)

    def read(self, key: str | None = None) -> np.ndarray:
        """The .npy's array (key None) or the .npz's array ``key`` (one of ``keys``)."""
        with _read_errors(self.path):
            if self._archive is None:
                self._file.seek(0)
                return _read_npy(self._file)
            with self._archive.open(self._members[key]) as member:
                return _read_npy(member)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._archive is not None:
            self._archive.close()
        self._file.close()


@contextmanager
def _read_errors(path: Path):
    """Any error inside becomes a ValueError naming the file: numpy and zipfile fail on damaged files in many
    ways, and each means the same here."""
    try:
        yield
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npy / .npz array file ({type(e).__name__}: {e}); expected an array "
                         "saved by numpy.save or numpy.savez, without pickled objects") from e


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_float32(values: np.ndarray, path: Path, where) -> None:
    """ValueError unless every entry of ``values`` (N, d) is finite once rounded to float32 (the dtype that
    training uses); ``where(i, j)`` names entry (i, j) as (row, column) in the file."""
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(values.astype(np.float32))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        row, column = where(i, j)
        raise ValueError(f"{path}: {row} holds NaN or inf in float32 ({column} is {float(values[i, j])!r}); expected "
                         f"finite numbers within +-{_FLOAT32_MAX:.7g}, the float32 range (training runs in float32)")


def _read_csv(path: Path, label_column: str | int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(features (N, d) float64, labels (N,) float64 or None) of a numeric UTF-8 CSV with an optional header row;
    every cell must be finite in float32."""
    rows, lines = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                if row and any(cell.strip() for cell in row):
                    rows.append(row)
                    lines.append(reader.line_num)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason}: byte {e.object[e.start]:#04x}); expected a CSV file "
                         "encoded as UTF-8 or ASCII (re-save it as UTF-8, e.g. from Latin-1)") from None
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
        header, rows, lines = [cell.strip() for cell in rows[0]], rows[1:], lines[1:]
    width = len(header) if header is not None else len(rows[0]) if rows else 0
    values = np.empty((len(rows), width))
    for i, (line, row) in enumerate(zip(lines, rows)):
        if len(row) != width:
            raise ValueError(f"{path}: line {line} has {len(row)} cells; expected {width} like the first row")
        for k, cell in enumerate(row):
            try:
                values[i, k] = float(cell)
            except ValueError:
                raise ValueError(f"{path}: line {line}, column {k + 1}: {cell!r} is not a number; expected numeric "
                                 "cells (only the first row may be a header)") from None
    _check_float32(values, path, lambda i, k: (f"line {lines[i]}", f"column {k + 1}"))
    if label_column is None:
        return values, None
    index = _column_index(header, label_column, width, path)
    return np.delete(values, index, axis=1), values[:, index]


def _read_arrays(path: Path, label_key: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(array, labels or None) as stored in a .npy or .npz file."""
    with NumpyFile(path) as file:
        keys = file.keys
        if keys is None:
            if label_key is not None:
                raise ValueError(f"{path}: a .npy file holds one array and no labels; --label-column {label_key!r} "
                                 "needs a .npz (labels under a key) or a .csv (a label column)")
            return file.read(), None
        label_keys = (label_key,) if label_key is not None else _LABEL_KEYS
        found_label = next((k for k in label_keys if k in keys), None)
        if label_key is not None and found_label is None:
            raise ValueError(f"{path}: arrays {keys} have no key {label_key!r} for the labels")
        data_keys = [k for k in _DATA_KEYS if k in keys] or [k for k in keys if k != found_label]
        if len(data_keys) != 1 and not (data_keys and data_keys[0] in _DATA_KEYS):
            raise ValueError(f"{path}: arrays {keys}; expected the data under 'x' or 'data' (or as the only array "
                             "besides the labels 'y' / 'labels')")
        return file.read(data_keys[0]), (file.read(found_label) if found_label else None)


def held_out_split(n: int, fraction: float, seed: int | torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): a permutation drawn from ``seed`` (an int in [0, 2**63 - 1] or a
    generator), the last round(fraction n) held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held_out_fraction must lie in (0, 1), got {fraction}")
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(check_seed(seed))
    if n < 2:
        raise ValueError(f"{n} sample{'s (empty)' if n == 0 else ''}: too few to split; expected at least 2 (one to "
                         "train on, one held out)")
    held = round(fraction * n)
    if not 0 < held < n:
        raise ValueError(f"held_out_fraction {fraction} of {n} samples holds out {held}; expected between 1 and {n - 1}")
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
    Every fault raises an error naming the file and what was expected: a value that is not finite in
    float32, labels above ``ot_cfm.utils.validation.MAX_CLASSES``, a CSV that is not UTF-8.
    """
    if not isinstance(seed, torch.Generator):
        check_seed(seed)
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
    _check_float32(values, path, lambda i, j: (f"row {i}", f"column {j}"))  # a .csv's cells were checked by line
    label_tensor = None if raw_labels is None else torch.from_numpy(
        check_class_array(np.asarray(raw_labels), values.shape[0], f"{path}: labels", per="row"))
    data = torch.from_numpy(values)
    mean = std = None
    if standardize:  # in float64: |mean| and std are at most max |v|, so finite in float32 like the values
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
