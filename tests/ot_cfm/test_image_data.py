"""Image readers on small files each test writes itself: MNIST IDX (plain and gzipped), CIFAR-10 binary
and python batches (the python ones in the layout Python 2 wrote), .npy / .npz arrays, folders of PNGs.

Checked: shapes, dtypes, the scaling formula on exact pixel values, labels, the held-out split
(deterministic, disjoint, official where the dataset has one), errors naming the file for missing,
truncated and malformed files, and crafted pickles that are refused without running anything.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shlex
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ot_cfm.images import (
    CIFAR10_CLASSES,
    ImageDataset,
    load_image_dataset,
    read_array_file,
    read_cifar10,
    read_cifar_batch,
    read_idx,
    read_image_folder,
    read_mnist,
)

RNG = np.random.default_rng(0)


def scaled(v: np.ndarray) -> torch.Tensor:
    """x = v / 127.5 - 1 computed independently in float64, for comparisons within float32 rounding."""
    return torch.from_numpy(v.astype(np.float64) / 127.5 - 1.0)


def assert_uint8_scaling(images: torch.Tensor, pixels: np.ndarray):
    assert images.dtype == torch.float32
    assert torch.allclose(images.double(), scaled(pixels), rtol=0, atol=1e-7)
    assert images.min() >= -1 and images.max() <= 1


def cut(path, keep=0.5):
    """Truncate a file in the middle."""
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


# ---------------------------------------------------------------- MNIST

def write_idx(path, array: np.ndarray, magic: int | None = None, gz: bool = False):
    magic = 0x0800 + array.ndim if magic is None else magic
    raw = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def mnist_folder(folder, n_train=6, n_test=4, h=5, w=7):
    """IDX files with non-square images (H != W catches swapped axes): training pair gzipped, test pair plain."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for split, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        images = RNG.integers(0, 256, (n, h, w), dtype=np.uint8)
        images[0, 0, :3] = (0, 255, 51)
        labels = RNG.integers(0, 10, n, dtype=np.uint8)
        labels[0] = 9
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, gz=gz)
        data[split] = images, labels
    return data


def test_mnist_gzipped_and_plain_shapes_scaling_labels(tmp_path):
    data = mnist_folder(tmp_path)
    for split, key in (("train", "train"), ("test", "t10k")):
        images, labels = read_mnist(tmp_path, split)
        pixels, digits = data[key]
        assert images.shape == (pixels.shape[0], 1, 5, 7) and labels.dtype == torch.int64
        assert_uint8_scaling(images[:, 0], pixels)
        assert images[0, 0, 0, 0] == -1.0 and images[0, 0, 0, 1] == 1.0
        assert abs(images[0, 0, 0, 2].item() - (-0.6)) < 1e-7  # 51 / 127.5 - 1
        assert labels.tolist() == digits.tolist()


def test_mnist_held_out_is_the_official_test_split(tmp_path):
    data = mnist_folder(tmp_path / "mnist")
    ds = load_image_dataset("mnist", root=tmp_path / "mnist")
    assert isinstance(ds, ImageDataset) and ds.name == "mnist" and ds.split == "official test split"
    assert ds.shape == (1, 5, 7) and ds.class_names == tuple(str(k) for k in range(10))
    assert_uint8_scaling(ds.train_images[:, 0], data["train"][0])
    assert_uint8_scaling(ds.held_out_images[:, 0], data["t10k"][0])
    assert ds.held_out_labels.tolist() == data["t10k"][1].tolist()
    detected = load_image_dataset(tmp_path / "mnist")  # a path: its kind is recognised from the files
    assert detected.name == "mnist" and torch.equal(detected.train_images, ds.train_images)


def test_mnist_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        read_mnist(tmp_path)
    images = RNG.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        read_mnist(tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated_file_is_named(tmp_path, gz):
    path = tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    write_idx(path, RNG.integers(0, 256, (50, 28, 28), dtype=np.uint8), gz=gz)
    cut(path)
    with pytest.raises(ValueError, match="truncated") as info:
        read_idx(path, 3)
    assert str(path) in str(info.value)


def test_mnist_wrong_magic_and_mismatched_counts(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((2, 3, 3), dtype=np.uint8), magic=1234)
    with pytest.raises(ValueError, match="magic number 1234; expected 2051") as info:
        read_idx(path, 3)
    assert str(path) in str(info.value)
    labels = tmp_path / "train-labels-idx1-ubyte"
    write_idx(labels, np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="expected 2051"):  # a label file where images belong
        read_idx(labels, 3)
    write_idx(path, np.zeros((3, 3, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="2 labels, but .* holds 3 images"):
        read_mnist(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="27 bytes of data, but the file holds 28"):
        read_idx(path, 3)


# ---------------------------------------------------------------- CIFAR-10

class Python2Pickler(pickle._Pickler):
    """Writes what Python 2 wrote for CIFAR-10: bytes as str (BINSTRING), numpy 1's module names."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__name__}\n".encode())
        self.memoize(obj)


def python_batch_bytes(data, labels, protocol="python2") -> bytes:
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [int(v) for v in labels], b"data": data,
             b"filenames": [f"image_{k:05d}.png".encode() for k in range(len(labels))]}
    if protocol != "python2":
        return pickle.dumps(batch, protocol=protocol)
    buffer = __import__("io").BytesIO()
    Python2Pickler(buffer, protocol=2).dump(batch)
    return buffer.getvalue()


def cifar_records(n):
    """(pixels (n, 3072) uint8: red, green, blue 32x32 planes, labels (n,)), with known corner values."""
    data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
    data[0, 0], data[0, 1024 + 33], data[0, 2048 + 1023] = 255, 0, 51  # red (0, 0), green (1, 1), blue (31, 31)
    return data, RNG.integers(0, 10, n, dtype=np.uint8)


def write_cifar(folder, binary: bool, n=3, protocol="python2"):
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data, labels = cifar_records(n)
        if binary:
            (folder / f"{name}.bin").write_bytes(np.concatenate([labels[:, None], data], axis=1).tobytes())
        else:
            (folder / name).write_bytes(python_batch_bytes(data, labels, protocol))
        written[name] = data, labels
    return written


def check_cifar_batch(images, labels, data, digits):
    assert images.shape == (data.shape[0], 3, 32, 32) and labels.dtype == torch.int64
    assert_uint8_scaling(images, data.reshape(-1, 3, 32, 32))
    assert images[0, 0, 0, 0] == 1.0 and images[0, 1, 1, 1] == -1.0
    assert abs(images[0, 2, 31, 31].item() - (-0.6)) < 1e-7
    assert labels.tolist() == digits.tolist()


def test_python2_fixture_is_the_real_layout(tmp_path):
    """The fixture loads with the standard unpickler as CIFAR's files do: bytes keys, numpy 1 globals, no _codecs."""
    data, labels = cifar_records(2)
    raw = python_batch_bytes(data, labels)
    assert b"numpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    batch = pickle.loads(raw, encoding="bytes")
    assert np.array_equal(batch[b"data"], data) and batch[b"labels"] == labels.tolist()


@pytest.mark.parametrize("protocol", ["python2", 2, 4, 5])
def test_cifar_python_batches(tmp_path, protocol):
    written = write_cifar(tmp_path / "cifar-10-batches-py", binary=False, protocol=protocol)
    images, labels = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_2")
    check_cifar_batch(images, labels, *written["data_batch_2"])
    ds = load_image_dataset("cifar10", root=tmp_path)
    assert ds.shape == (3, 32, 32) and ds.class_names == CIFAR10_CLASSES and ds.split == "official test split"
    assert ds.train_images.shape[0] == 15 and ds.held_out_images.shape[0] == 3
    check_cifar_batch(ds.train_images[:3], ds.train_labels[:3], *written["data_batch_1"])
    check_cifar_batch(ds.held_out_images, ds.held_out_labels, *written["test_batch"])


def test_cifar_binary_batches_match_python_ones(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-bin", binary=True)
    for name, (data, labels) in written.items():
        (tmp_path / "py").mkdir(exist_ok=True)
        (tmp_path / "py" / name).write_bytes(python_batch_bytes(data, labels))
    for split in ("train", "test"):
        binary, python = read_cifar10(tmp_path, split), read_cifar10(tmp_path / "py", split)
        assert torch.equal(binary[0], python[0]) and torch.equal(binary[1], python[1])
    check_cifar_batch(*read_cifar10(tmp_path, "test"), *written["test_batch"])
    assert load_image_dataset(tmp_path / "cifar-10-batches-bin").name == "cifar10"


def test_cifar_missing_truncated_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        read_cifar10(tmp_path)
    written = write_cifar(tmp_path / "bin", binary=True)
    (tmp_path / "bin" / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4.bin"):
        read_cifar10(tmp_path / "bin")
    path = tmp_path / "bin" / "data_batch_1.bin"
    cut(path)
    with pytest.raises(ValueError, match="3073-byte records") as info:
        read_cifar_batch(path)
    assert str(path) in str(info.value)
    data, labels = written["test_batch"]
    labels[0] = 10
    path.write_bytes(np.concatenate([labels[:, None], data], axis=1).tobytes())
    with pytest.raises(ValueError, match="label 10; expected CIFAR-10 classes 0..9"):
        read_cifar_batch(path)

    path = tmp_path / "data_batch_1"
    path.write_bytes(python_batch_bytes(data[:, :1000], labels))
    with pytest.raises(ValueError, match=r"expected a uint8 array \(N, 3072\)"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ValueError, match="expected a dict with keys b'data' and b'labels'"):
        read_cifar_batch(path)
    path.write_bytes(python_batch_bytes(*cifar_records(40)))
    cut(path)
    with pytest.raises(ValueError, match="not a readable CIFAR-10 python batch") as info:
        read_cifar_batch(path)
    assert str(path) in str(info.value)


class WritesFile:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


class RunsShell:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return os.system, (f"echo executed > {shlex.quote(self.target)}",)


@pytest.mark.parametrize("payload", [WritesFile, RunsShell])
@pytest.mark.parametrize("where", ["data", "labels"])
def test_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path, payload, where):
    target = tmp_path / "created_by_the_pickle"
    data, labels = cifar_records(2)
    batch = {b"data": data, b"labels": labels.tolist()}
    batch[where.encode()] = payload(target)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refused to unpickle the global") as info:
        read_cifar_batch(path)
    assert str(path) in str(info.value)
    assert not target.exists()


def test_crafted_payload_does_create_the_file_with_a_plain_unpickler(tmp_path):
    """Control for the test above: the payload is live, so its refusal is what kept the file from existing."""
    target = tmp_path / "created"
    pickle.loads(pickle.dumps({b"data": WritesFile(target)}, protocol=2), encoding="bytes").get(b"data").close()
    assert target.exists()


# ---------------------------------------------------------------- arrays

def test_npy_layouts_and_dtypes(tmp_path):
    nchw = RNG.integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    nchw[0, :, 0, 0] = (0, 255, 51)
    expected = scaled(nchw)
    cases = {"nchw_uint8": nchw, "nhwc_uint8": nchw.transpose(0, 2, 3, 1),
             "nchw_int64": nchw.astype(np.int64)}
    for name, array in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
        images, labels = read_array_file(tmp_path / f"{name}.npy")
        assert images.shape == (4, 3, 5, 6) and images.dtype == torch.float32, name
        assert torch.allclose(images.double(), expected, rtol=0, atol=1e-7), name
        assert images[0, 0, 0, 0] == -1 and images[0, 1, 0, 0] == 1
        assert labels.tolist() == [0, 0, 0, 0] and labels.dtype == torch.int64

    grey = RNG.integers(0, 256, (3, 5, 6), dtype=np.uint8)
    np.save(tmp_path / "grey.npy", grey)
    images, _ = read_array_file(tmp_path / "grey.npy")
    assert images.shape == (3, 1, 5, 6) and torch.allclose(images[:, 0].double(), scaled(grey), atol=1e-7)

    unit = np.array([0.0, 0.25, 0.5, 1.0], dtype=np.float32).reshape(1, 1, 2, 2)
    np.save(tmp_path / "unit.npy", unit)
    assert read_array_file(tmp_path / "unit.npy")[0].flatten().tolist() == [-1.0, -0.5, 0.0, 1.0]
    signed = np.array([-1.0, -0.3, 0.7, 1.0], dtype=np.float64).reshape(1, 2, 2, 1)  # NHWC, already in [-1, 1]
    np.save(tmp_path / "signed.npy", signed)
    images, _ = read_array_file(tmp_path / "signed.npy")
    assert images.shape == (1, 1, 2, 2) and images.flatten().tolist() == torch.tensor([-1.0, -0.3, 0.7, 1.0]).tolist()


def test_npz_labels_and_keys(tmp_path):
    images = RNG.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.array([2, 0, 1, 2, 0]))
    np.savez_compressed(tmp_path / "b.npz", x=images, y=np.array([2, 0, 1, 2, 0], dtype=np.uint8))
    np.savez(tmp_path / "c.npz", images)  # one unnamed array: arr_0
    for name in ("a", "b", "c"):
        x, y = read_array_file(tmp_path / f"{name}.npz")
        assert x.shape == (5, 3, 4, 4) and torch.allclose(x.double(), scaled(images.transpose(0, 3, 1, 2)), atol=1e-7)
        assert y.dtype == torch.int64 and y.tolist() == ([0] * 5 if name == "c" else [2, 0, 1, 2, 0])
    ds = load_image_dataset("npz", root=tmp_path / "a.npz", held_out_fraction=0.4)
    assert ds.class_names == ("0", "1", "2") and ds.train_images.shape[0] == 3 and ds.held_out_images.shape[0] == 2
    np.savez(tmp_path / "d.npz", first=images, second=images)
    with pytest.raises(ValueError, match=r"arrays \['first', 'second'\]; expected the images under 'images' or 'x'"):
        read_array_file(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", images=images, labels=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels of shape \(2,\); expected one per image, shape \(5,\)"):
        read_array_file(tmp_path / "e.npz")


def test_array_values_and_shapes_that_are_refused(tmp_path):
    refused = {"wide.npy": (np.full((2, 1, 4, 4), 2.0), r"span \[2, 2\]; expected floats in \[0, 1\] or in \[-1, 1\]"),
               "big.npy": (np.full((2, 3, 3), 256, dtype=np.int32), "expected values in 0..255"),
               "nan.npy": (np.full((2, 3, 3), np.nan), "NaN or infinity"),
               "bool.npy": (np.zeros((2, 3, 3), dtype=bool), "expected uint8"),
               "five.npy": (np.zeros((2, 5, 4, 4), dtype=np.uint8), "expected 1 or 3 channels"),
               "flat.npy": (np.zeros((2, 9), dtype=np.uint8), r"expected \(N, H, W\)"),
               "ambiguous.npy": (np.zeros((2, 3, 4, 3), dtype=np.uint8), "pass layout='nchw' or layout='nhwc'")}
    for name, (array, message) in refused.items():
        np.save(tmp_path / name, array)
        with pytest.raises(ValueError, match=message) as info:
            read_array_file(tmp_path / name)
        assert str(tmp_path / name) in str(info.value), name
    assert read_array_file(tmp_path / "ambiguous.npy", layout="nhwc")[0].shape == (2, 3, 3, 4)
    assert read_array_file(tmp_path / "ambiguous.npy", layout="nchw")[0].shape == (2, 3, 4, 3)


def test_array_files_missing_truncated_or_pickled(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a .npy or .npz array file") as info:
        read_array_file(tmp_path / "absent.npy")
    assert "absent.npy" in str(info.value)
    array = RNG.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)
    for name in ("cut.npy", "cut.npz"):
        path = tmp_path / name
        (np.save if name.endswith("npy") else np.savez)(path, array)
        cut(path)
        with pytest.raises(ValueError, match="not a readable .npy / .npz array file") as info:
            read_array_file(path)
        assert str(path) in str(info.value)
    target = tmp_path / "created_by_the_array"
    np.save(tmp_path / "objects.npy", np.array([WritesFile(target)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        read_array_file(tmp_path / "objects.npy")
    assert not target.exists()


# ---------------------------------------------------------------- folders

def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def class_folder(root, h=4, w=5, rgb=True):
    """Classes dog, ant, cat (sorted: ant, cat, dog); one pixel with known values per image."""
    written = {}
    for name, count in (("dog", 2), ("ant", 3), ("cat", 1)):
        for k in range(count):
            array = RNG.integers(0, 256, (h, w, 3) if rgb else (h, w), dtype=np.uint8)
            array[0, 0] = 255 if k == 0 else 0
            write_png(root / name / f"{k:02d}.png", array)
            written[(name, k)] = array
    (root / "ant" / "notes.txt").write_text("not an image")
    write_png(root / "stray.png", np.zeros((h, w), dtype=np.uint8))  # not in a class folder: ignored
    return written


@pytest.mark.parametrize("rgb", [True, False])
def test_folder_classes_modes_and_scaling(tmp_path, rgb):
    written = class_folder(tmp_path, rgb=rgb)
    images, labels, classes = read_image_folder(tmp_path)
    assert classes == ("ant", "cat", "dog") and labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert images.shape == (6, 3 if rgb else 1, 4, 5) and images.dtype == torch.float32
    order = [("ant", 0), ("ant", 1), ("ant", 2), ("cat", 0), ("dog", 0), ("dog", 1)]
    expected = np.stack([written[key] for key in order])
    expected = expected.transpose(0, 3, 1, 2) if rgb else expected[:, None]
    assert torch.allclose(images.double(), scaled(expected), rtol=0, atol=1e-7)
    assert images[0, 0, 0, 0] == 1.0 and images[1, 0, 0, 0] == -1.0
    assert read_image_folder(tmp_path, mode="RGB")[0].shape == (6, 3, 4, 5)
    ds = load_image_dataset(tmp_path, held_out_fraction=0.5, seed=1)
    assert ds.name == "folder" and ds.class_names == classes and ds.train_images.shape[0] == 3


def test_folder_mixed_modes_sizes_and_resizing(tmp_path):
    class_folder(tmp_path, rgb=False)
    write_png(tmp_path / "cat" / "colour.png", np.full((4, 5, 3), (255, 0, 0), dtype=np.uint8))
    images, _, _ = read_image_folder(tmp_path)
    assert images.shape == (7, 3, 4, 5)  # one colour image makes the whole set RGB
    assert images[4, :, 0, 0].tolist() == [1.0, -1.0, -1.0]  # cat/colour.png, after cat/00.png: red
    odd = tmp_path / "dog" / "odd.png"
    write_png(odd, np.zeros((6, 6), dtype=np.uint8))
    with pytest.raises(ValueError, match="6x6 pixels .* has 5x4; expected one size") as info:
        read_image_folder(tmp_path)
    assert str(odd) in str(info.value)
    resized, _, _ = read_image_folder(tmp_path, size=(3, 2), mode="L")
    assert resized.shape == (8, 1, 3, 2) and resized.min() >= -1 and resized.max() <= 1
    uniform = tmp_path / "zebra" / "grey.png"
    write_png(uniform, np.full((6, 6), 51, dtype=np.uint8))
    resized, labels, classes = read_image_folder(tmp_path, size=3)
    assert classes[-1] == "zebra" and torch.allclose(resized[-1], torch.full((3, 3, 3), -0.6), atol=1e-6)


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="one subfolder of images per class"):
        read_image_folder(tmp_path / "absent")
    with pytest.raises(ValueError, match="no subfolders"):
        read_image_folder(tmp_path)
    class_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files") as info:
        read_image_folder(tmp_path)
    assert str(tmp_path / "empty") in str(info.value)
    (tmp_path / "empty").rmdir()
    big = tmp_path / "cat" / "big.png"
    write_png(big, RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    cut(big, keep=0.7)
    with pytest.raises(ValueError, match="not a readable image") as info:
        read_image_folder(tmp_path)
    assert str(big) in str(info.value)
    big.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="not a readable image") as info:
        read_image_folder(tmp_path)
    assert str(big) in str(info.value)


# ---------------------------------------------------------------- the entry point and its split

def test_seeded_split_is_deterministic_and_disjoint(tmp_path):
    n = 50
    ids = np.arange(n, dtype=np.uint8)
    images = np.broadcast_to(ids[:, None, None, None], (n, 1, 2, 2)).copy()  # image k has every pixel k
    np.savez(tmp_path / "ids.npz", images=images, labels=ids % 3)
    load = lambda **kw: load_image_dataset(tmp_path / "ids.npz", **kw)  # noqa: E731
    first, again, other = load(seed=7), load(seed=7), load(seed=8)
    assert torch.equal(first.train_images, again.train_images) and torch.equal(first.held_out_labels,
                                                                               again.held_out_labels)
    identity = lambda ds, part: set(((getattr(ds, f"{part}_images")[:, 0, 0, 0] + 1) * 127.5).round().int().tolist())  # noqa: E731
    train, held = identity(first, "train"), identity(first, "held_out")
    assert len(held) == 10 and len(train) == 40 and not train & held and train | held == set(range(n))
    assert held != identity(other, "held_out")
    rows = ((first.train_images[:, 0, 0, 0] + 1) * 127.5).round().long()
    assert torch.equal(first.train_labels, rows % 3)  # labels travel with their images
    from_generator = load(seed=torch.Generator().manual_seed(7))
    assert torch.equal(from_generator.held_out_images, first.held_out_images)
    assert identity(load(held_out_fraction=0.3), "held_out").__len__() == 15
    for bad in (0.0, 1.0, 0.001):
        with pytest.raises(ValueError, match="held_out_fraction"):
            load(held_out_fraction=bad)


def test_digits_default_needs_no_files():
    ds = load_image_dataset()
    assert ds.name == "digits" and ds.shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.train_images.shape[0] + ds.held_out_images.shape[0] == 1797 and ds.held_out_images.shape[0] == 359
    assert ds.train_images.dtype == torch.float32 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.min() == -1 and ds.train_images.max() == 1
    values = torch.cat([ds.train_images, ds.held_out_images]).unique()
    assert torch.equal(values, torch.arange(17) / 8.0 - 1.0)  # digits take values 0..16: x = v / 8 - 1
    assert torch.equal(load_image_dataset().held_out_images, ds.held_out_images)
    sampler = ds.train_sampler()
    assert sampler(4, torch.Generator().manual_seed(0)).shape == (4, 1, 8, 8)
    x, y = ds.train_sampler(labelled=True)(4, torch.Generator().manual_seed(0))
    assert torch.equal(x, sampler(4, torch.Generator().manual_seed(0)))  # the same rows, now with their labels
    rows = [int((ds.train_images == xi).flatten(1).all(1).nonzero()[0]) for xi in x]
    assert torch.equal(y, ds.train_labels[rows])


def test_entry_point_refuses_unclear_requests(tmp_path):
    with pytest.raises(ValueError, match="pass root="):
        load_image_dataset("mnist")
    with pytest.raises(ValueError, match="pass no root"):
        load_image_dataset("digits", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a dataset name"):
        load_image_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "image.txt").write_text("x")
    with pytest.raises(ValueError, match="expected a .npy or .npz array file, or a folder"):
        load_image_dataset(tmp_path / "image.txt")
