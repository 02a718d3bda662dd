"""The image datasets' one entry point, ``load_image_dataset``: digits, MNIST, CIFAR-10, array files, class folders.

It picks the reader from a name or a path and returns an ``ImageDataset`` with a deterministic held-out split
(the official test split of MNIST and CIFAR-10, a seeded split of the rest). Nothing is ever downloaded: MNIST,
CIFAR-10, arrays and folders are read from files the user gives. scikit-learn's digits (values 0..16) are
scaled x = v / 8 - 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ot_cfm.data import TensorSampler, held_out_split, load_digits
from ot_cfm.images.cifar import CIFAR10_CLASSES, CIFAR_FOLDERS, read_cifar10
from ot_cfm.images.readers import MNIST_FILES, NO_DOWNLOAD, class_names_of, read_array_file, read_image_folder, read_mnist
from ot_cfm.utils.validation import check_seed

__all__ = ["IMAGE_DATASETS", "ImageDataset", "load_image_dataset"]


#: dataset names that ``load_image_dataset`` accepts besides a path ("npy" and "npz" both mean an array file)
IMAGE_DATASETS = ("digits", "mnist", "cifar10", "npy", "npz", "folder")


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
    for folder in (path, *(path / sub for sub in CIFAR_FOLDERS)):
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
    if not isinstance(seed, torch.Generator):
        check_seed(seed)
    if isinstance(name_or_path, str) and name_or_path in IMAGE_DATASETS:
        kind = "npy" if name_or_path == "npz" else name_or_path
        if kind == "digits":
            if root is not None:
                raise ValueError("the digits ship inside scikit-learn: pass no root for them")
        elif root is None:
            raise ValueError(f"{name_or_path!r} reads local files: pass root=<{'file' if kind == 'npy' else 'folder'}> "
                             f"({NO_DOWNLOAD})")
        path = None if root is None else Path(root)
    else:
        if root is not None:
            raise ValueError(f"got the path {name_or_path} and root={root}; give the path once")
        path = Path(name_or_path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder, and not a dataset name; expected one of "
                                    f"{', '.join(IMAGE_DATASETS)} or a path ({NO_DOWNLOAD})")
        kind = _detect(path)
    if kind in ("mnist", "cifar10"):
        reader = read_mnist if kind == "mnist" else read_cifar10
        (train, train_labels), (test, test_labels) = (reader(path, split, dtype=dtype) for split in ("train", "test"))
        classes = class_names_of(torch.cat([train_labels, test_labels]).numpy()) if kind == "mnist" else CIFAR10_CLASSES
        return ImageDataset(kind, train, train_labels, test, test_labels, classes, "official test split")
    if kind == "digits":
        images, labels = load_digits(dtype=dtype)
        classes = tuple(str(k) for k in range(10))
    elif kind == "npy":
        images, labels = read_array_file(path, layout=layout, dtype=dtype)
        classes = class_names_of(labels.numpy())
    else:
        images, labels, classes = read_image_folder(path, mode=mode, size=size, dtype=dtype)
    try:
        train, held = held_out_split(images.shape[0], held_out_fraction, seed)
    except ValueError as e:
        raise ValueError(f"{path or kind}: {e}") from None
    seed_text = "a torch.Generator" if isinstance(seed, torch.Generator) else f"seed {seed}"
    return ImageDataset(kind, images[train], labels[train], images[held], labels[held], classes,
                        f"seeded split: {held.numel()} of {images.shape[0]} images held out ({seed_text})")
