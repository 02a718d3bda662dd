"""Hostile input files: every value is bounded before memory is taken for it, and every refusal is a ValueError
that names the file (so ``ot-cfm`` reports it with exit status 2 instead of a traceback).

Each file is written here by hand: CSV cells beyond float32, .npy / .npz / IDX headers announcing more than the
file holds, CIFAR-10 pickles that call numpy's constructors, labels of 10^12, seeds beyond int64. Where the old
readers took memory for what a header announced, ``tracemalloc`` (which numpy reports its buffers to) bounds the
peak instead of a clock.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

from ot_cfm.cli import main
from ot_cfm.data import held_out_split, load_array_dataset
from ot_cfm.images import load_image_dataset, read_array_file, read_cifar_batch, read_idx
from ot_cfm.training import TrainConfig
from ot_cfm.utils.validation import MAX_CLASSES

FLOAT32_MAX = float(np.finfo(np.float32).max)
TRAIN = ["train", "--steps", "2", "--batch-size", "8", "--width", "8", "--eval-samples", "20", "--workers", "0",
         "--no-progress"]


def peak_traced_bytes(call) -> int:
    """The peak of memory traced by tracemalloc (Python and numpy allocations) while ``call()`` raises ValueError."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def met_memory_error(error: BaseException) -> bool:
    """Whether a MemoryError is anywhere in the chain of causes and contexts of ``error``."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return any(isinstance(e, MemoryError) for e in seen)


def cli_error(argv, capsys) -> str:
    """``ot-cfm argv`` must end with exit status 2; returns what it printed to stderr."""
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------- 1. values beyond float32

@pytest.mark.parametrize("cell", ["1e300", "1e39", "-4e38", "nan"])
def test_csv_cell_beyond_float32_is_refused_naming_line_and_column(tmp_path, cell):
    path = tmp_path / "rows.csv"
    path.write_text(f"a,b\n1,2\n3,4\n\n5,6\n7,{cell}\n8,9\n")  # the blank line 4 still counts
    for standardize in (False, True):
        with pytest.raises(ValueError, match=r"line 6 holds NaN or inf in float32 \(column 2 is ") as info:
            load_array_dataset(path, standardize=standardize)
        assert str(path) in str(info.value)


def test_csv_cell_at_the_float32_limit_loads_and_standardises_to_finite_statistics(tmp_path):
    """The largest float32 magnitudes still load, and their standardisation stays finite (std <= max |v|)."""
    path = tmp_path / "rows.csv"
    path.write_text(f"{-FLOAT32_MAX!r},1\n{FLOAT32_MAX!r},2\n{FLOAT32_MAX!r},3\n{-FLOAT32_MAX!r},4\n")
    ds = load_array_dataset(path, standardize=True, held_out_fraction=0.25)
    assert torch.isfinite(ds.mean).all() and torch.isfinite(ds.std).all()
    assert ds.std[0].item() == FLOAT32_MAX and ds.mean[0].item() == 0.0
    every = torch.cat([ds.train, ds.held_out])
    assert sorted(every[:, 0].tolist()) == [-1.0, -1.0, 1.0, 1.0]


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_array_value_beyond_float32_is_refused_naming_row_and_column(tmp_path, suffix):
    array = np.arange(12, dtype=np.float64).reshape(4, 3)
    array[2, 1] = 1e39
    path = tmp_path / f"rows{suffix}"
    (np.save if suffix == ".npy" else lambda p, a: np.savez(p, x=a))(path, array)
    with pytest.raises(ValueError, match=r"row 2 holds NaN or inf in float32 \(column 1 is 1e\+39\)") as info:
        load_array_dataset(path)
    assert str(path) in str(info.value)


def test_cli_refuses_an_overflowing_csv_instead_of_training_on_inf(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n" + "".join(f"{k},{k % 7}\n" for k in range(40)) + "1e300,1\n")
    err = cli_error([*TRAIN, "--data", str(path), "--standardize", "--out", str(tmp_path / "run")], capsys)
    assert str(path) in err and "line 42 holds NaN or inf in float32" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ---------------------------------------------------------------- 2. headers and pickles that announce more than the file

def npy_bytes(shape, payload: bytes, descr="<f8") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + payload


@pytest.mark.parametrize("read", [load_array_dataset, read_array_file])
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_npy_header_announcing_gigabytes_is_refused_without_allocating_them(tmp_path, read, suffix):
    """A 144-byte .npy (or .npz member) announcing (2^27, 2) float64, 2 GiB: numpy.load allocated them first."""
    raw = npy_bytes((2**27, 2), b"\0" * 16)
    path = tmp_path / f"big{suffix}"
    if suffix == ".npy":
        path.write_bytes(raw)
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", raw)
    assert peak_traced_bytes(lambda: read(path)) < 2**23
    with pytest.raises(ValueError, match=r"announces shape \(134217728, 2\) of float64, 2147483648 bytes, but 16 "
                                         "follow") as info:
        read(path)
    assert str(path) in str(info.value)


def test_gzipped_idx_reads_no_further_than_its_header_announces(tmp_path):
    """A gzipped IDX file whose header announces 4 bytes, followed by 64 MiB of zeros (64 KiB compressed)."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">iiii", 2051, 1, 2, 2))
        for _ in range(64):
            f.write(bytes(2**20))
    assert path.stat().st_size < 2**17
    assert peak_traced_bytes(lambda: read_idx(path, 3)) < 2**23
    with pytest.raises(ValueError, match=r"announces shape \(1, 2, 2\), 4 bytes of data, but the file holds 5 or "
                                         "more bytes") as info:
        read_idx(path, 3)
    assert str(path) in str(info.value)


class Calls:
    """Pickles as ``function(*args)``: what a crafted file asks the unpickler to call."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def write_batch(path, data, labels, protocol=4):
    path.write_bytes(pickle.dumps({b"batch_label": b"crafted", b"labels": labels, b"data": data}, protocol=protocol))
    return path


def test_cifar_pickle_calling_ndarray_with_a_huge_shape_is_refused_before_allocating(tmp_path):
    """Under 200 bytes asking numpy.ndarray for (2^40, 3072) uint8, 3 PiB: refused, not tried (no MemoryError)."""
    path = write_batch(tmp_path / "data_batch_1", Calls(np.ndarray, (2**40, 3072), "u1"), [0])
    assert path.stat().st_size < 200
    with pytest.raises(ValueError, match="call of numpy.ndarray, which would make an array of uninitialised memory"
                       ) as info:
        read_cifar_batch(path)
    assert str(path) in str(info.value)
    assert not met_memory_error(info.value)  # refused, not tried


def test_cifar_pickle_of_uninitialised_images_is_refused(tmp_path):
    """numpy.ndarray((4, 3072), 'u1') is uninitialised memory of the right shape: the old reader returned it."""
    path = write_batch(tmp_path / "data_batch_1", Calls(np.ndarray, (4, 3072), "u1"), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="call of numpy.ndarray") as info:
        read_cifar_batch(path)
    assert str(path) in str(info.value)


def test_cifar_pickle_reconstructing_a_huge_shape_or_another_dtype_is_refused(tmp_path):
    """numpy's own reconstruction, misused: an empty array of a huge shape, or arrays that are not uint8."""
    reconstruct = np.zeros(1).__reduce__()[0]
    path = write_batch(tmp_path / "data_batch_1", Calls(reconstruct, np.ndarray, (2**40, 3072), b"b"), [0])
    with pytest.raises(ValueError, match=r"_reconstruct of shape \(1099511627776, 3072\)") as info:
        read_cifar_batch(path)
    assert str(path) in str(info.value) and not met_memory_error(info.value)
    data = np.zeros((2, 3072), dtype=np.uint8)
    for protocol in (2, 5):
        path = write_batch(tmp_path / "data_batch_1", data, np.array([1, 2], dtype=np.int64), protocol)
        with pytest.raises(ValueError, match="uint8 arrays only") as info:
            read_cifar_batch(path)
        assert str(path) in str(info.value)


def test_cifar_pickle_whose_shape_disagrees_with_its_bytes_is_refused(tmp_path):
    """A _frombuffer (protocol 5) claiming more entries than the bytes it carries."""
    frombuffer = np.zeros(1, dtype=np.uint8).__reduce_ex__(5)[0]
    dtype = np.dtype(np.uint8)
    path = write_batch(tmp_path / "data_batch_1", Calls(frombuffer, bytearray(3072), dtype, (2**20, 3072), "C"), [0],
                       protocol=5)
    with pytest.raises(ValueError, match=r"shape \(1048576, 3072\) on bytearray of 3072 bytes") as info:
        read_cifar_batch(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_pickle_of_a_fortran_ordered_uint8_array_still_reads(tmp_path, protocol):
    """What the unpickler keeps admitting: numpy's own pickles of uint8 arrays, in either memory order."""
    data = np.asfortranarray(np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8))
    images, labels = read_cifar_batch(write_batch(tmp_path / "data_batch_1", data, [7, 0, 3], protocol))
    assert np.array_equal(((images.double() + 1) * 127.5).round().to(torch.uint8).reshape(3, 3072).numpy(), data)
    assert labels.tolist() == [7, 0, 3]


def test_cli_reports_a_refused_cifar_pickle_with_exit_status_2(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    path = write_batch(folder / "data_batch_1", Calls(np.ndarray, (4, 3072), "u1"), [0, 1, 2, 3])
    err = cli_error([*TRAIN, "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")],
                    capsys)
    assert str(path) in err and "call of numpy.ndarray" in err


# ---------------------------------------------------------------- 2 and 3. class counts

def test_image_labels_from_max_classes_on_are_refused(tmp_path):
    images = np.zeros((10, 8, 8), dtype=np.uint8)
    path = tmp_path / "images.npz"
    np.savez(path, images=images, labels=np.array([0] * 9 + [MAX_CLASSES - 1]))
    assert load_image_dataset(path).num_classes == MAX_CLASSES
    np.savez(path, images=images, labels=np.array([0] * 9 + [MAX_CLASSES]))
    with pytest.raises(ValueError, match=f"labels include {MAX_CLASSES}; expected class indices below "
                                         f"MAX_CLASSES = {MAX_CLASSES}") as info:
        load_image_dataset(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("label", [MAX_CLASSES, 10**12, 2**40, 1e300])
def test_array_labels_from_max_classes_on_are_refused(tmp_path, label):
    path = tmp_path / "rows.npz"
    np.savez(path, x=np.zeros((10, 2)), y=np.array([0] * 9 + [label]))
    with pytest.raises(ValueError, match="expected class indices below MAX_CLASSES") as info:
        load_array_dataset(path)
    assert str(path) in str(info.value)
    np.savez(path, x=np.zeros((10, 2)), y=np.array([0] * 9 + [MAX_CLASSES - 1]))
    assert load_array_dataset(path).num_classes == MAX_CLASSES


def test_cli_conditional_run_on_labels_of_10_to_the_12_names_the_file(tmp_path, capsys):
    """The label embedding would have had 10^12 + 1 rows (64 TB at width 16)."""
    path = tmp_path / "rows.csv"
    path.write_text("a,b,y\n" + "".join(f"{k},{k % 5},{k % 3}\n" for k in range(30)) + "1,2,1000000000000\n")
    err = cli_error([*TRAIN, "--data", str(path), "--label-column", "y", "--conditional", "--out",
                     str(tmp_path / "run")], capsys)
    assert str(path) in err and "labels include 1000000000000" in err and "MAX_CLASSES" in err


# ---------------------------------------------------------------- 4. messages that name the file or the argument

def test_latin1_csv_is_refused_naming_the_file_and_the_encoding(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    path.write_bytes("caf\xe9,b\n1,2\n3,4\n5,6\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text .*expected a CSV file encoded as UTF-8") as info:
        load_array_dataset(path)
    assert str(path) in str(info.value)
    err = cli_error([*TRAIN, "--data", str(path), "--out", str(tmp_path / "run")], capsys)
    assert str(path) in err and "UTF-8" in err


def test_utf8_csv_with_a_byte_order_mark_keeps_its_first_row(tmp_path):
    """Excel's UTF-8 starts with a byte order mark: read as text it made '\\ufeff1' a header and lost row 1."""
    path = tmp_path / "rows.csv"
    path.write_bytes("\ufeff1,2\n3,4\n5,6\n".encode("utf-8"))
    ds = load_array_dataset(path, held_out_fraction=0.34)
    assert sorted(map(tuple, torch.cat([ds.train, ds.held_out]).tolist())) == [(1.0, 2.0), (3.0, 4.0), (5.0, 6.0)]


@pytest.mark.parametrize("n", [0, 1])
def test_image_file_with_too_few_images_to_split_says_so(tmp_path, n):
    path = tmp_path / "images.npy"
    np.save(path, np.zeros((n, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=f"{n} sample.*too few to split; expected at least 2") as info:
        load_image_dataset(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "empty" in str(info.value) or n == 1
    with pytest.raises(ValueError, match="0 samples .empty.: too few to split"):
        held_out_split(0, 0.2, 0)


@pytest.mark.parametrize("seed", [2**63, 2**64, -1, True, 1.5])
def test_seeds_outside_int64_are_refused_naming_the_argument(tmp_path, seed):
    rows = tmp_path / "rows.npy"
    np.save(rows, np.arange(20.0).reshape(10, 2))
    images = tmp_path / "images.npy"
    np.save(images, np.zeros((10, 8, 8), dtype=np.uint8))
    for call in (lambda: TrainConfig(seed=seed), lambda: load_array_dataset(rows, seed=seed),
                 lambda: load_image_dataset(images, seed=seed), lambda: held_out_split(10, 0.2, seed)):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\], got "):
            call()


def test_largest_seed_is_accepted_and_splits_deterministically(tmp_path):
    assert TrainConfig(seed=2**63 - 1).seed == 2**63 - 1
    rows = tmp_path / "rows.npy"
    np.save(rows, np.arange(20.0).reshape(10, 2))
    a, b = (load_array_dataset(rows, seed=2**63 - 1) for _ in range(2))
    assert torch.equal(a.held_out, b.held_out)
    train, held = held_out_split(10, 0.2, 2**63 - 1)
    assert sorted(torch.cat([train, held]).tolist()) == list(range(10))


def test_cli_huge_seed_names_the_argument(tmp_path, capsys):
    rows = tmp_path / "rows.npy"
    np.save(rows, np.arange(80.0).reshape(40, 2))
    with pytest.raises(SystemExit) as stop:  # the parser refuses it, before the file is read
        main([*TRAIN, "--data", str(rows), "--seed", str(2**64), "--out", str(tmp_path / "run")])
    assert stop.value.code == 2 and "seed must be an integer in [0, 2**63 - 1]" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["train", "--steps", "1"], ["sample", "checkpoint.pt"]])
@pytest.mark.parametrize("seed", [str(2**64), "-1", "1.5"])
def test_cli_seed_outside_int64_is_refused_by_the_parser_naming_the_option(command, seed, capsys):
    """Toy, image and sample runs seed torch before any TrainConfig exists: the parser refuses the value first."""
    with pytest.raises(SystemExit) as stop:
        main([*command, "--seed", seed])
    assert stop.value.code == 2 and "argument --seed:" in capsys.readouterr().err
