"""CIFAR-10's batches, binary or python, read into tensors.

The python batches are pickles of a dict {b'batch_label': bytes, b'labels': [int] * N, b'data': uint8 array
(N, 3072), b'filenames': [bytes] * N}. They are read by an unpickler that admits only what such a dict needs:
numpy's reconstruction of a uint8 array from the bytes in the file (its shape must match their count), so a
crafted file can neither run code nor make an array larger than itself; anything else is refused with a
ValueError naming the file.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from ot_cfm.images.readers import NO_DOWNLOAD, require_file, scale_uint8
from ot_cfm.utils.validation import check_class_array

__all__ = ["CIFAR10_CLASSES", "read_cifar_batch", "read_cifar10"]


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


CIFAR_BATCHES = {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)}
CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-10-batches-bin")
_CIFAR_RECORD = 1 + 3 * 32 * 32  # binary batches: one label byte, then the red, green and blue 32x32 planes


# ---------------------------------------------------------------- CIFAR-10 (binary and python batches)

class _RefusedPickle(ValueError, pickle.UnpicklingError):
    """A CIFAR-10 python batch asked for something a genuine batch does not hold (a ValueError naming the file)."""


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2, restricted to that use."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _RefusedPickle(f"_codecs.encode({type(text).__name__}, {encoding!r}): only latin-1 encoding of text "
                            "rebuilds bytes")
    return text.encode("latin-1")


class _Uint8:
    """``numpy.dtype(name, align, copy)`` as a pickle calls it, for 'u1' only; its state (one byte has no byte
    order) is not used: arrays are built with numpy's own uint8."""

    def __init__(self, name, align=False, copy=True):
        if name not in ("u1", b"u1"):
            raise _RefusedPickle(f"numpy dtype {name!r}; a CIFAR-10 python batch holds uint8 arrays only")

    def __setstate__(self, state):
        pass


def _uint8_array(data, dtype, shape, fortran: bool) -> np.ndarray:
    """A uint8 array of ``shape`` on the pickle's own bytes ``data``, whose count must be the shape's product."""
    if not isinstance(dtype, _Uint8):
        raise _RefusedPickle(f"an array of dtype {dtype!r}; a CIFAR-10 python batch holds uint8 arrays only")
    if not (isinstance(data, (bytes, bytearray)) and type(shape) is tuple
            and all(type(k) is int and k >= 0 for k in shape) and math.prod(shape) == len(data)):
        raise _RefusedPickle(f"an array of shape {shape!r} on {type(data).__name__} of "
                            f"{len(data) if isinstance(data, (bytes, bytearray)) else '?'} bytes; expected as many "
                            "bytes as the shape has entries")
    return np.frombuffer(data, np.uint8).reshape(shape, order="F" if fortran else "C")


class _PickledArray:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``, the empty array a pickle then fills with
    ``__setstate__((version, shape, dtype, is_fortran, data))``; ``array`` holds the result."""

    def __init__(self, subtype, shape, typecode):
        if subtype is not _ndarray or shape != (0,) or typecode not in (b"b", "b"):
            raise _RefusedPickle(f"numpy _reconstruct of shape {shape!r} and typecode {typecode!r}; numpy pickles an "
                                "array as _reconstruct(ndarray, (0,), b'b') and then its state")
        self.array = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _RefusedPickle("an array state that is not (version, shape, dtype, is_fortran, data)")
        _, shape, dtype, fortran, data = state
        self.array = _uint8_array(data, dtype, shape, bool(fortran))


def _frombuffer(data, dtype, shape, order):
    """``numpy.core.numeric._frombuffer``, as protocol 5 pickles an array (its bytes in the file)."""
    return _uint8_array(data, dtype, shape, order == "F")


def _ndarray(*args):
    """``numpy.ndarray`` as a pickle names it: an argument of ``_reconstruct``, never called."""
    raise _RefusedPickle("a call of numpy.ndarray, which would make an array of uninitialised memory of any size; numpy "
                        "pickles an array as _reconstruct(ndarray, (0,), b'b') and its bytes")


_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _PickledArray,   # as written by numpy 1 (and Python 2)
    ("numpy._core.multiarray", "_reconstruct"): _PickledArray,  # as written by numpy 2
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _Uint8,
    ("_codecs", "encode"): _latin1_encode,  # bytes in a protocol-2 pickle written by Python 3
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the globals that CIFAR-10's python batches need to rebuild their uint8 arrays."""

    def __init__(self, file):
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_ALLOWED:
            return _PICKLE_ALLOWED[(module, name)]
        raise _RefusedPickle(f"refused to unpickle the global {module}.{name}")

    def persistent_load(self, pid):
        raise _RefusedPickle("refused a persistent id")


def _get(batch: dict, key: str):
    for k in (key.encode(), key):
        if k in batch:
            value = batch[k]
            return value.array if isinstance(value, _PickledArray) else value
    return None


def _cifar_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _CifarUnpickler(io.BytesIO(path.read_bytes())).load()
    except _RefusedPickle as e:
        raise _RefusedPickle(f"{path}: {e}; a CIFAR-10 python batch holds only a dict of bytes, lists of numbers and "
                            "a uint8 array built from its own bytes, so nothing else is loaded (and no code in the "
                            "file runs)") from None
    except Exception as e:  # a malformed pickle can fail in many ways; each means the same to the user
        raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e}); expected a "
                         "complete pickle of a dict with keys b'data' and b'labels'") from e
    data = _get(batch, "data") if isinstance(batch, dict) else None
    labels = _get(batch, "labels") if isinstance(batch, dict) else None
    if data is None or labels is None:
        raise ValueError(f"{path}: holds a {type(batch).__name__}"
                         + (f" with keys {sorted(map(repr, batch))}" if isinstance(batch, dict) else "")
                         + "; expected a dict with keys b'data' and b'labels' (a CIFAR-10 python batch)")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"array of shape {data.shape} and dtype {data.dtype}" if isinstance(data, np.ndarray) else type(data)
        raise ValueError(f"{path}: b'data' is {desc}; expected a uint8 array (N, 3072)")
    if not (isinstance(labels, np.ndarray) or (isinstance(labels, list) and all(type(v) is int for v in labels))):
        raise ValueError(f"{path}: b'labels' is a {type(labels).__name__}; expected a list of integers")
    labels = check_class_array(np.asarray(labels), data.shape[0], f"{path}: b'labels'", per="image")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = path.read_bytes()
    if not raw or len(raw) % _CIFAR_RECORD:
        raise ValueError(f"{path}: {len(raw)} bytes; expected a whole number of {_CIFAR_RECORD}-byte records "
                         "(1 label byte + 3072 pixel bytes) of a CIFAR-10 binary batch (truncated?)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _cifar_batch_uint8(path: Path) -> tuple[np.ndarray, np.ndarray]:
    path = require_file(path, "a CIFAR-10 batch (binary data_batch_k.bin / test_batch.bin, or python "
                               "data_batch_k / test_batch)")
    images, labels = (_cifar_binary_batch if path.suffix == ".bin" else _cifar_python_batch)(path)
    if labels.size and labels.max() >= len(CIFAR10_CLASSES):
        raise ValueError(f"{path}: label {labels.max()}; expected CIFAR-10 classes 0..9")
    return images, labels


def read_cifar_batch(path: str | os.PathLike, *,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 batch: binary (name ending in ``.bin``) or python pickle (any other name).

    Returns images (N, 3, 32, 32), x = v / 127.5 - 1, channels red, green, blue, and labels (N,) int64 in 0..9.
    """
    images, labels = _cifar_batch_uint8(Path(path))
    return scale_uint8(images, dtype), torch.from_numpy(labels)


def _cifar_batch_paths(root: Path, split: str) -> list[Path]:
    names = CIFAR_BATCHES[split]
    for folder in (root, *(root / sub for sub in CIFAR_FOLDERS)):
        for suffix in ("", ".bin"):
            if any((folder / f"{name}{suffix}").is_file() for name in ("data_batch_1", "test_batch")):
                return [folder / f"{name}{suffix}" for name in names]
    raise FileNotFoundError(f"{root}: no CIFAR-10 batches (data_batch_1 ... data_batch_5 and test_batch, as python "
                            f"pickles or with the .bin suffix) here or in {' or '.join(CIFAR_FOLDERS)} "
                            f"({NO_DOWNLOAD})")


def read_cifar10(root: str | os.PathLike, split: str = "train", *,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10's training (data_batch_1..5) or test (test_batch) split from ``root``.

    ``root`` holds the batches, or the extracted ``cifar-10-batches-py`` / ``cifar-10-batches-bin``
    folder; python batches are preferred when both are present. Returns images (N, 3, 32, 32),
    x = v / 127.5 - 1, and labels (N,) int64 (class names: ``CIFAR10_CLASSES``).
    """
    if split not in CIFAR_BATCHES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    batches = [_cifar_batch_uint8(path) for path in _cifar_batch_paths(Path(root), split)]
    images = np.concatenate([b[0] for b in batches]) if len(batches) > 1 else batches[0][0]
    labels = np.concatenate([b[1] for b in batches])
    return scale_uint8(images, dtype), torch.from_numpy(labels)
