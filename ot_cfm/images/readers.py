"""Image files read into tensors: MNIST's IDX files, numpy array files and folders of image files (one
subfolder per class), with the pixel scaling and layout checks every reader shares.

Every reader returns images (N, C, H, W) in [-1, 1] (float32 unless ``dtype`` says otherwise) and
labels (N,) int64. Pixel scaling, per source:

    uint8 (and integer arrays with values in 0..255):  x = v / 127.5 - 1      (0 -> -1, 255 -> 1)
    float arrays with every value in [0, 1]:            x = 2 v - 1
    float arrays with a negative value, all in [-1, 1]: x = v                 (already scaled)

A missing, truncated or malformed file raises an error naming the file and what was expected. Array files
hold no pickles; sizes that headers announce are read only as far as the file's bytes go, and labels must
lie below ``ot_cfm.utils.validation.MAX_CLASSES``.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ot_cfm.data.arrays import NumpyFile, read_at_most
from ot_cfm.utils.validation import check_class_array

__all__ = ["IMAGE_EXTENSIONS", "read_idx", "read_mnist", "read_array_file", "read_image_folder"]


#: file name endings (lower case) that ``read_image_folder`` reads; other files are ignored
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


NO_DOWNLOAD = "nothing is downloaded: give the folder holding the files"


# ---------------------------------------------------------------- scaling and layout

def scale_uint8(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
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
        return scale_uint8(array.astype(np.uint8, copy=False), dtype)
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


def class_names_of(labels: np.ndarray) -> tuple[str, ...]:
    return tuple(str(k) for k in range(int(labels.max()) + 1 if labels.size else 1))


def require_file(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file; expected {expected} ({NO_DOWNLOAD})")
    return path


# ---------------------------------------------------------------- MNIST (IDX files)

def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with ``ndim`` dimensions (gzipped or not) as a uint8 array.

    Header: magic number 0x0800 + ndim as a big-endian int32 (2051 for images, 2049 for labels),
    then ``ndim`` big-endian int32 sizes; the file must hold exactly their product of bytes after it.
    At most that many bytes and one more are read (and decompressed), whatever the file holds.
    """
    path = require_file(Path(path), f"an IDX file with {ndim} dimension(s)")
    expected_magic, header = 0x0800 + ndim, 4 + 4 * ndim
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path) if gzipped else open(path, "rb") as f:
            head = read_at_most(f, header)
            magic = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
            if magic != expected_magic:
                found = f"magic number {magic}" if magic is not None else f"only {len(head)} bytes"
                raise ValueError(f"{path}: {found}; expected {expected_magic} (IDX, unsigned bytes, {ndim} dimension(s))")
            if len(head) < header:
                raise ValueError(f"{path}: {len(head)} bytes, shorter than the {header}-byte header of an IDX file "
                                 f"with {ndim} dimension(s) (truncated)")
            dims = tuple(int(d) for d in np.frombuffer(head[4:], dtype=">u4"))
            size = math.prod(dims)
            data = read_at_most(f, size + 1)
    except (EOFError, OSError, zlib.error) as e:
        if not gzipped:
            raise
        raise ValueError(f"{path}: truncated or corrupt gzip data ({e}); expected a complete gzipped IDX file") from e
    if len(data) != size:
        raise ValueError(f"{path}: the header announces shape {dims}, {size} bytes of data, but the file holds "
                         f"{len(data)}{' or more' if len(data) > size else ''} bytes after its {header}-byte header"
                         + (" (truncated)" if len(data) < size else ""))
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _find_mnist_file(root: Path, name: str) -> Path:
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    files = ", ".join(f for pair in MNIST_FILES.values() for f in pair)
    raise FileNotFoundError(f"{root}: no {name} or {name}.gz; an MNIST folder holds {files}, each optionally "
                            f"gzipped ({NO_DOWNLOAD})")


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
    return scale_uint8(images[:, None], dtype), torch.from_numpy(labels.astype(np.int64))




# ---------------------------------------------------------------- array files

_IMAGE_KEYS, _LABEL_KEYS = ("images", "x"), ("labels", "y")


def _load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images array, labels array or None) as stored in a .npy or .npz file."""
    with NumpyFile(path) as file:
        keys = file.keys
        if keys is None:
            return file.read(), None
        image_keys = [k for k in _IMAGE_KEYS if k in keys] or [k for k in keys if k not in _LABEL_KEYS]
        if not image_keys or (len(image_keys) > 1 and image_keys[0] not in _IMAGE_KEYS):
            raise ValueError(f"{path}: arrays {keys}; expected the images under 'images' or 'x' "
                             "(or as the only array besides 'labels' / 'y')")
        label_key = next((k for k in _LABEL_KEYS if k in keys), None)
        return file.read(image_keys[0]), (file.read(label_key) if label_key else None)


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
    path = require_file(Path(path), "a .npy or .npz array file")
    array, labels = _load_arrays(path)
    images = _scale_array(_to_nchw(array, path, layout), path, dtype)
    labels = (np.zeros(images.shape[0], dtype=np.int64) if labels is None
              else check_class_array(labels, images.shape[0], f"{path}: labels", per="image"))
    return images, torch.from_numpy(labels)


# ---------------------------------------------------------------- folders of image files

_GREY_MODES = ("1", "L", "LA")


def _image_files(root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; expected a folder with one subfolder of images per class "
                                f"({NO_DOWNLOAD})")
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
    return scale_uint8(stacked, dtype), labels, classes
