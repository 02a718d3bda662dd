"""Image datasets read from local files into tensors: digits, MNIST, CIFAR-10, array files, class folders.

Every reader returns images (N, C, H, W) in [-1, 1] (float32 unless ``dtype`` says otherwise) and
labels (N,) int64. Pixel scaling, per source:

    uint8 (and integer arrays with values in 0..255):  x = v / 127.5 - 1      (0 -> -1, 255 -> 1)
    float arrays with every value in [0, 1]:            x = 2 v - 1
    float arrays with a negative value, all in [-1, 1]: x = v                 (already scaled)
    scikit-learn's digits (values 0..16):               x = v / 8 - 1

``load_image_dataset`` is the one entry point: it picks the reader from a name or a path and
returns an ``ImageDataset`` with a deterministic held-out split (the official test split of MNIST
and CIFAR-10, a seeded split of the rest). Nothing is ever downloaded: MNIST, CIFAR-10, arrays and
folders are read from files the user gives. A missing, truncated or malformed file raises an
error naming the file and what was expected. CIFAR-10's python batches are pickles; they are read
by an unpickler that admits only numpy's array reconstruction, so a crafted file cannot run code.
Array files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ot_cfm.data import TensorSampler, held_out_split, load_digits

__all__ = [
    "IMAGE_DATASETS", "CIFAR10_CLASSES", "IMAGE_EXTENSIONS", "ImageDataset", "load_image_dataset",
    "read_idx", "read_mnist", "read_cifar_batch", "read_cifar10", "read_array_file", "read_image_folder",
]

#: dataset names that ``load_image_dataset`` accepts besides a path ("npy" and "npz" both mean an array file)
IMAGE_DATASETS = ("digits", "mnist", "cifar10", "npy", "npz", "folder")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: file name endings (lower case) that ``read_image_folder`` reads; other files are ignored
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CIFAR_BATCHES = {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)}
_CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-10-batches-bin")
_CIFAR_RECORD = 1 + 3 * 32 * 32  # binary batches: one label byte, then the red, green and blue 32x32 planes
_NO_DOWNLOAD = "nothing is downloaded: give the folder holding the files"


# ---------------------------------------------------------------- scaling and layout

def _scale_uint8(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """uint8 array -> tensor of ``dtype`` with x = v / 127.5 - 1."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # a view of file bytes; torch wants memory it may write
        array = array.copy()
    return torch.from_numpy(array).to(dtype).div_(127.5).sub_(1.0)


def _scale_array(array: np.ndarray, path: Path, dtype: torch.dtype) -> torch.Tensor:
    """Pixel values of an array file -> [-1, 1] by the rule in the module docstring."""
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"{path}: integer pixels span [{array.min()}, {array.max()}]; expected values in 0..255")
        return _scale_uint8(array.astype(np.uint8, copy=False), dtype)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: pixels of dtype {array.dtype}; expected uint8 (0..255) or float "
                         "(in [0, 1] or [-1, 1])")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: pixels include NaN or infinity; expected floats in [0, 1] or [-1, 1]")
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    x = torch.from_numpy(np.array(array, order="C")).to(dtype)
    if 0.0 <= lo and hi <= 1.0:
        return x.mul_(2.0).sub_(1.0)
    if -1.0 <= lo and hi <= 1.0:
        return x
    raise ValueError(f"{path}: float pixels span [{lo:g}, {hi:g}]; expected floats in [0, 1] or in [-1, 1] "
                     "(or uint8 in 0..255)")


def _to_nchw(array: np.ndarray, path: Path, layout: str) -> np.ndarray:
    """(N, H, W) grey, (N, C, H, W) or (N, H, W, C) with C in {1, 3} -> (N, C, H, W) (a view)."""
    if layout not in ("auto", "nchw", "nhwc"):
        raise ValueError(f"layout must be 'auto', 'nchw' or 'nhwc', got {layout!r}")
    if array.ndim == 3:
        return array[:, None]
    if array.ndim != 4:
        raise ValueError(f"{path}: array of shape {array.shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C)")
    first, last = array.shape[1] in (1, 3), array.shape[3] in (1, 3)
    if layout == "auto":
        if first and last:
            raise ValueError(f"{path}: shape {array.shape} could be (N, C, H, W) or (N, H, W, C); "
                             "pass layout='nchw' or layout='nhwc'")
        layout = "nchw" if first else "nhwc" if last else ""
    if layout == "nhwc":
        array = array.transpose(0, 3, 1, 2)
    if array.shape[1] not in (1, 3) or not layout:
        raise ValueError(f"{path}: shape {array.shape}; expected 1 or 3 channels, on axis 1 (N, C, H, W) "
                         "or axis 3 (N, H, W, C)")
    return array


def _check_labels(labels: np.ndarray, n: int, path: Path, what: str = "labels") -> np.ndarray:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{path}: {what} of shape {labels.shape}; expected one per image, shape ({n},)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {what} of dtype {labels.dtype}; expected integers")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{path}: {what} include {labels.min()}; expected class indices >= 0")
    return labels.astype(np.int64)


def _class_names(labels: np.ndarray) -> tuple[str, ...]:
    return tuple(str(k) for k in range(int(labels.max()) + 1 if labels.size else 1))


def _require_file(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file; expected {expected} ({_NO_DOWNLOAD})")
    return path


# ---------------------------------------------------------------- MNIST (IDX files)

def _read_maybe_gzipped(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: truncated or corrupt gzip data ({e}); expected a complete gzipped IDX file") from e


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with ``ndim`` dimensions (gzipped or not) as a uint8 array.

    Header: magic number 0x0800 + ndim as a big-endian int32 (2051 for images, 2049 for labels),
    then ``ndim`` big-endian int32 sizes; the file must hold exactly their product of bytes after it.
    """
    path = _require_file(Path(path), f"an IDX file with {ndim} dimension(s)")
    raw = _read_maybe_gzipped(path)
    expected_magic, header = 0x0800 + ndim, 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expected_magic:
        found = f"magic number {magic}" if magic is not None else f"only {len(raw)} bytes"
        raise ValueError(f"{path}: {found}; expected {expected_magic} (IDX, unsigned bytes, {ndim} dimension(s))")
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes, shorter than the {header}-byte header of an IDX file "
                         f"with {ndim} dimension(s) (truncated)")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    size = math.prod(dims)
    if len(raw) - header != size:
        raise ValueError(f"{path}: the header announces shape {dims}, {size} bytes of data, but the file holds "
                         f"{len(raw) - header} bytes after its {header}-byte header"
                         + (" (truncated)" if len(raw) - header < size else ""))
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_mnist_file(root: Path, name: str) -> Path:
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    files = ", ".join(f for pair in MNIST_FILES.values() for f in pair)
    raise FileNotFoundError(f"{root}: no {name} or {name}.gz; an MNIST folder holds {files}, each optionally "
                            f"gzipped ({_NO_DOWNLOAD})")


def read_mnist(root: str | os.PathLike, split: str = "train", *,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's training or test split from its IDX files in ``root`` (also ``root/raw``, ``root/MNIST/raw``).

    Returns images (N, 1, H, W) with x = v / 127.5 - 1 (N = 60000 or 10000, H = W = 28 for MNIST;
    any IDX pair of the same layout, e.g. Fashion-MNIST, reads the same way) and labels (N,) int64.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    image_file, label_file = (_find_mnist_file(root, name) for name in MNIST_FILES[split])
    images, labels = read_idx(image_file, 3), read_idx(label_file, 1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{label_file}: {labels.shape[0]} labels, but {image_file} holds {images.shape[0]} images; "
                         "expected one label per image")
    return _scale_uint8(images[:, None], dtype), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------- CIFAR-10 (binary and python batches)

def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2, restricted to that use."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode({type(text).__name__}, {encoding!r}): only "
                                     "latin-1 encoding of text rebuilds bytes")
    return text.encode("latin-1")


_PROBE = np.zeros(1, dtype=np.uint8)
_RECONSTRUCT = _PROBE.__reduce__()[0]      # numpy's array reconstruction (protocols 0 to 4)
_FROMBUFFER = _PROBE.__reduce_ex__(5)[0]   # numpy's array from a buffer (protocol 5)
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,   # as written by numpy 1 (and Python 2)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # as written by numpy 2
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,  # bytes in a protocol-2 pickle written by Python 3
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the globals that CIFAR-10's python batches need to rebuild numpy arrays."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _PICKLE_ALLOWED:
            return _PICKLE_ALLOWED[(module, name)]
        raise _RefusedGlobal(f"{self.path}: refused to unpickle the global {module}.{name}; a CIFAR-10 python "
                             "batch holds only dicts, lists, bytes, numbers and numpy arrays, so nothing else "
                             "is loaded (and no code in the file runs)")

    def persistent_load(self, pid):
        raise _RefusedGlobal(f"{self.path}: refused a persistent id; a CIFAR-10 python batch has none")


def _get(batch: dict, key: str):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    return None


def _cifar_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _CifarUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except _RefusedGlobal:
        raise
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
    labels = _check_labels(np.asarray(labels), data.shape[0], path, "b'labels'")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = path.read_bytes()
    if not raw or len(raw) % _CIFAR_RECORD:
        raise ValueError(f"{path}: {len(raw)} bytes; expected a whole number of {_CIFAR_RECORD}-byte records "
                         "(1 label byte + 3072 pixel bytes) of a CIFAR-10 binary batch (truncated?)")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


def _cifar_batch_uint8(path: Path) -> tuple[np.ndarray, np.ndarray]:
    path = _require_file(path, "a CIFAR-10 batch (binary data_batch_k.bin / test_batch.bin, or python "
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
    return _scale_uint8(images, dtype), torch.from_numpy(labels)


def _cifar_batch_paths(root: Path, split: str) -> list[Path]:
    names = CIFAR_BATCHES[split]
    for folder in (root, *(root / sub for sub in _CIFAR_FOLDERS)):
        for suffix in ("", ".bin"):
            if any((folder / f"{name}{suffix}").is_file() for name in ("data_batch_1", "test_batch")):
                return [folder / f"{name}{suffix}" for name in names]
    raise FileNotFoundError(f"{root}: no CIFAR-10 batches (data_batch_1 ... data_batch_5 and test_batch, as python "
                            f"pickles or with the .bin suffix) here or in {' or '.join(_CIFAR_FOLDERS)} "
                            f"({_NO_DOWNLOAD})")


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
    return _scale_uint8(images, dtype), torch.from_numpy(labels)


# ---------------------------------------------------------------- array files

_IMAGE_KEYS, _LABEL_KEYS = ("images", "x"), ("labels", "y")


class _ArrayKeyError(ValueError):
    pass


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images array, labels array or None) as stored in a .npy or .npz file."""
    with open(path, "rb") as f:
        loaded = np.load(f, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded:
            keys = list(loaded.files)
            image_keys = [k for k in _IMAGE_KEYS if k in keys] or [k for k in keys if k not in _LABEL_KEYS]
            if not image_keys or (len(image_keys) > 1 and image_keys[0] not in _IMAGE_KEYS):
                raise _ArrayKeyError(f"{path}: arrays {keys}; expected the images under 'images' or 'x' "
                                     "(or as the only array besides 'labels' / 'y')")
            label_key = next((k for k in _LABEL_KEYS if k in keys), None)
            return loaded[image_keys[0]], (loaded[label_key] if label_key else None)


def read_array_file(path: str | os.PathLike, *, layout: str = "auto",
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images from a ``.npy`` or ``.npz`` file, read with ``allow_pickle=False``.

    Shapes: (N, H, W) grey, (N, C, H, W) or (N, H, W, C) with C = 1 or 3; ``layout`` "auto" tells the
    last two apart by which axis has 1 or 3 entries and refuses a shape where both do ("nchw" or
    "nhwc" then decides). Pixels: uint8 or integers in 0..255 (x = v / 127.5 - 1); floats in [0, 1]
    (x = 2 v - 1); floats with a negative value, all in [-1, 1] (kept). Anything else is refused.
    An ``.npz`` holds the images under ``images`` or ``x`` (or as its only other array) and optional
    labels (N,) under ``labels`` or ``y``; without labels every image gets label 0.

    Returns images (N, C, H, W) and labels (N,) int64.
    """
    path = _require_file(Path(path), "a .npy or .npz array file")
    try:
        array, labels = _load_arrays(path)
    except _ArrayKeyError:
        raise
    except Exception as e:  # numpy and zipfile fail on damaged files in many ways; each means the same here
        raise ValueError(f"{path}: not a readable .npy / .npz array file ({type(e).__name__}: {e}); expected an "
                         "array saved by numpy.save or numpy.savez, without pickled objects") from e
    images = _scale_array(_to_nchw(array, path, layout), path, dtype)
    labels = (np.zeros(images.shape[0], dtype=np.int64) if labels is None
              else _check_labels(labels, images.shape[0], path))
    return images, torch.from_numpy(labels)


# ---------------------------------------------------------------- folders of image files

_GREY_MODES = ("1", "L", "LA")


def _image_files(root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; expected a folder with one subfolder of images per class "
                                f"({_NO_DOWNLOAD})")
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        raise ValueError(f"{root}: no subfolders; expected one subfolder of image files per class")
    files = []
    for label, name in enumerate(classes):
        found = sorted(f for f in (root / name).iterdir()
                       if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise ValueError(f"{root / name}: no image files; expected files ending in {', '.join(IMAGE_EXTENSIONS)} "
                             "in every class subfolder")
        files += [(f, label) for f in found]
    return classes, files


def _open_image(path: Path, decode: bool):
    """The image at ``path``, its header read (and its pixels decoded when ``decode``); errors name the file."""
    from PIL import Image

    try:
        image = Image.open(path)
        if decode:
            image.load()  # a truncated file fails here
    except Exception as e:  # Pillow reports damaged files as OSError, SyntaxError or ValueError
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e}); expected a complete image file "
                         "that Pillow reads") from e
    if image.mode.startswith(("I", "F")):
        image.close()
        raise ValueError(f"{path}: Pillow mode {image.mode!r} (16-bit or float pixels); expected 8 bits per channel")
    return image


def read_image_folder(root: str | os.PathLike, *, mode: str | None = None, size: int | tuple[int, int] | None = None,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """A folder with one subfolder per class, each holding image files (read with Pillow).

    Classes are the subfolder names in sorted order (label k = k-th name); files directly in
    ``root``, hidden files and files whose names do not end in ``IMAGE_EXTENSIONS`` are ignored.
    ``mode`` "L" (grey) or "RGB"; None takes "L" when every image is grey ("1", "L", "LA") and "RGB"
    otherwise (an alpha channel is dropped). ``size`` (H, W) or an int for square images resizes
    every image (bicubic, aspect ratio not kept); None requires one size for all and names the
    first file that differs. Pixels: x = v / 127.5 - 1.

    Returns images (N, C, H, W) with C = 1 for "L" and 3 for "RGB", labels (N,) int64, class names.
    """
    from PIL import Image

    if mode not in (None, "L", "RGB"):
        raise ValueError(f"mode must be None, 'L' or 'RGB', got {mode!r}")
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be a positive int or (H, W), got {size}")
    root = Path(root)
    classes, files = _image_files(root)
    first = None
    for path, _ in files:  # headers only: the common mode, and one size unless resizing
        with _open_image(path, decode=False) as image:
            if mode is None and image.mode not in _GREY_MODES:
                mode = "RGB"
            if size is None and first is None:
                first = (path, image.size)
            elif size is None and image.size != first[1]:
                raise ValueError(f"{path}: {image.size[0]}x{image.size[1]} pixels (width x height), but {first[0]} "
                                 f"has {first[1][0]}x{first[1][1]}; expected one size for all images, or pass "
                                 "size=(H, W) to resize them")
    mode = mode or "L"
    arrays = []
    for path, _ in files:
        with _open_image(path, decode=True) as image:
            converted = image.convert(mode)
        if size is not None and converted.size != (size[1], size[0]):
            converted = converted.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(converted, dtype=np.uint8))
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return _scale_uint8(stacked, dtype), labels, classes


# ---------------------------------------------------------------- one entry point

@dataclass(frozen=True)
class ImageDataset:
    """Training and held-out images with their labels.

    Images (N, C, H, W) in [-1, 1], labels (N,) int64 indexing ``class_names``. ``split`` says where
    the held-out images come from: the dataset's official test split, or a seeded split.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    held_out_images: torch.Tensor
    held_out_labels: torch.Tensor
    class_names: tuple[str, ...]
    split: str

    def __post_init__(self):
        for images, labels, which in ((self.train_images, self.train_labels, "train"),
                                      (self.held_out_images, self.held_out_labels, "held-out")):
            if images.ndim != 4 or labels.shape != (images.shape[0],) or labels.dtype != torch.int64:
                raise ValueError(f"{which} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                                 f"({labels.dtype}); expected (N, C, H, W) and (N,) int64")
        if self.train_images.shape[1:] != self.held_out_images.shape[1:]:
            raise ValueError(f"train images {tuple(self.train_images.shape[1:])} and held-out images "
                             f"{tuple(self.held_out_images.shape[1:])} differ in shape")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_sampler(self, *, labelled: bool = False) -> TensorSampler:
        """i.i.d. draws (with replacement) of training images; with ``labelled`` each draw returns (images, labels)."""
        return TensorSampler(self.train_images, self.train_labels, labelled=labelled)


def _detect(path: Path) -> str:
    """The kind of dataset at an existing path."""
    if path.is_file():
        if path.suffix.lower() in (".npy", ".npz"):
            return "npy"
        raise ValueError(f"{path}: a file ending in {path.suffix!r}; expected a .npy or .npz array file, or a folder")
    for folder in (path, path / "raw", path / "MNIST" / "raw"):
        if any((folder / f"{MNIST_FILES['train'][0]}{s}").is_file() for s in ("", ".gz")):
            return "mnist"
    for folder in (path, *(path / sub for sub in _CIFAR_FOLDERS)):
        if any((folder / f"{name}{s}").is_file() for name in ("data_batch_1", "test_batch") for s in ("", ".bin")):
            return "cifar10"
    return "folder"


def load_image_dataset(name_or_path: str | os.PathLike = "digits", *, root: str | os.PathLike | None = None,
                       held_out_fraction: float = 0.2, seed: int | torch.Generator = 0, layout: str = "auto",
                       mode: str | None = None, size: int | tuple[int, int] | None = None,
                       dtype: torch.dtype = torch.float32) -> ImageDataset:
    """Read an image dataset from local files (nothing is downloaded) with a deterministic held-out split.

    ``name_or_path``: "digits" (scikit-learn's 1797 8x8 digits, embedded: the default), "mnist",
    "cifar10", "npy" / "npz" (an array file) or "folder" (one subfolder per class), each but digits
    reading from ``root``; or a path, whose kind is detected: a .npy / .npz file, a folder of MNIST
    IDX files, of CIFAR-10 batches, or else of class subfolders.

    Held-out images: MNIST's and CIFAR-10's official test splits; for the other sources a random
    ``held_out_fraction`` of the images (round(fraction N) of them, at least one each side), the
    permutation drawn from ``seed`` (an int, or a CPU ``torch.Generator``, which the draw advances):
    the same seed gives the same split. ``layout`` applies to array files, ``mode`` and ``size`` to
    folders (see ``read_array_file`` and ``read_image_folder``).

    Returns an ``ImageDataset``: images (N, C, H, W) in [-1, 1] of ``dtype``, labels (N,) int64.
    """
    if isinstance(name_or_path, str) and name_or_path in IMAGE_DATASETS:
        kind = "npy" if name_or_path == "npz" else name_or_path
        if kind == "digits":
            if root is not None:
                raise ValueError("the digits ship inside scikit-learn: pass no root for them")
        elif root is None:
            raise ValueError(f"{name_or_path!r} reads local files: pass root=<{'file' if kind == 'npy' else 'folder'}> "
                             f"({_NO_DOWNLOAD})")
        path = None if root is None else Path(root)
    else:
        if root is not None:
            raise ValueError(f"got the path {name_or_path} and root={root}; give the path once")
        path = Path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder, and not a dataset name; expected one of "
                                    f"{', '.join(IMAGE_DATASETS)} or a path ({_NO_DOWNLOAD})")
        kind = _detect(path)
    if kind in ("mnist", "cifar10"):
        reader = read_mnist if kind == "mnist" else read_cifar10
        (train, train_labels), (test, test_labels) = (reader(path, split, dtype=dtype) for split in ("train", "test"))
        classes = _class_names(torch.cat([train_labels, test_labels]).numpy()) if kind == "mnist" else CIFAR10_CLASSES
        return ImageDataset(kind, train, train_labels, test, test_labels, classes, "official test split")
    if kind == "digits":
        images, labels = load_digits(dtype=dtype)
        classes = tuple(str(k) for k in range(10))
    elif kind == "npy":
        images, labels = read_array_file(path, layout=layout, dtype=dtype)
        classes = _class_names(labels.numpy())
    else:
        images, labels, classes = read_image_folder(path, mode=mode, size=size, dtype=dtype)
    train, held = held_out_split(images.shape[0], held_out_fraction, seed)
    seed_text = "a torch.Generator" if isinstance(seed, torch.Generator) else f"seed {seed}"
    return ImageDataset(kind, images[train], labels[train], images[held], labels[held], classes,
                        f"seeded split: {held.numel()} of {images.shape[0]} images held out ({seed_text})")
