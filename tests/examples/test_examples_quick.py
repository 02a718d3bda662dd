"""Quick modes of the toy-training benchmark and of the toy and image examples: they run, write their
outputs, and their numbers have the properties the full runs are about."""

import json
import math
import sys

import pytest
import torch
from example_scripts import ROOT, load_script


def test_toy_training_benchmark_quick(tmp_path):
    bench = load_script("benchmarks/toy_training.py")
    report, results = tmp_path / "toy.md", tmp_path / "toy.json"
    assert bench.main(["--quick", "--out", str(report), "--json", str(results)]) == 0
    assert "## Step time" in report.read_text() and "## Sample quality" in report.read_text()
    written = json.loads(results.read_text())
    [row] = written["runs"]
    timing = written["worker_timing"]["gaussian-moons"]
    assert set(timing) == {"torchcfm", "ours-trainer, 0 workers", "ours-trainer, 2 workers"}
    assert all(v["step_ms"] > 0 for v in timing.values())
    # same initial weights, data and t draws: the Trainer reproduces the plain loop exactly
    assert row["trainer_matches_plain_loop"]
    variants = row["variants"]
    for name in ("torchcfm", "ours", "ours-trainer"):
        assert variants[name]["step_ms"] > 0 and 0 < variants[name]["coupling_share"] <= 1
    for name in ("torchcfm", "ours"):
        v = variants[name]
        assert all(math.isfinite(w) and w > 0 for w in v["w2"].values())
        assert [v["nfe"][f"euler-{k}"] for k in (1, 2, 4, 8)] == [1, 2, 4, 8]
        # 100 steps take N(0, I) -> moons from W2 about 1.8 to about 0.65 (0.52 is the 400-sample floor)
        assert v["w2"]["dopri5"] < 0.6 * v["w2_source"]
    # the same algorithm from the same start: ours is not worse than torchcfm beyond seed-level noise
    assert variants["ours"]["w2"]["dopri5"] < 1.3 * variants["torchcfm"]["w2"]["dopri5"]


def test_toy_2d_quick(tmp_path):
    toy = load_script("examples/toy_2d.py")
    figure = tmp_path / "toy.png"
    results = toy.run(["--quick", "--figure", str(figure)])
    assert figure.stat().st_size > 20_000
    ot, ind = results["OT-CFM"][0], results["I-CFM"][0]
    for quality in (ot, ind):
        assert all(math.isfinite(w) and w > 0 for w in quality.w2.values()) and math.isfinite(quality.npe)
    # Minibatch OT straightens the learned flow. Measured at these settings (seeds 0, 1, 2): OT-CFM
    # NPE 0.04 to 0.16, I-CFM 0.41 to 0.83; one Euler step: OT-CFM W2 0.63 to 0.74, I-CFM 1.8 to 2.6.
    assert ot.npe < ind.npe
    assert ot.w2["euler-1"] < 0.6 * ind.w2["euler-1"]


def test_images_quick(tmp_path):
    images = load_script("examples/images.py")
    result = images.run(["--quick", "--out", str(tmp_path / "runs"), "--figures", str(tmp_path / "figures")])
    assert result["figure"].stat().st_size > 10_000 and "| OT-CFM |" in result["table"].read_text()
    for method in ("OT-CFM", "I-CFM"):
        assert (tmp_path / "runs" / f"digits_{method}" / "checkpoint.pt").exists()
        w2 = result["w2"][method]
        assert all(math.isfinite(w) for w in w2.values())
        # training moved the samples towards the held-out digits; none can beat the sampling floor by much
        assert 0.8 * result["floor"] < w2["dopri5"] < 0.8 * result["noise"]


def test_images_missing_files_name_what_is_expected(tmp_path):
    images = load_script("examples/images.py")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        images.load_images("mnist", tmp_path, torch.Generator())
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        images.load_images("cifar10", tmp_path, torch.Generator())
    with pytest.raises(ValueError, match="give --data-path"):
        images.load_images("folder", None, torch.Generator())


def test_images_reads_local_files_through_the_library(tmp_path):
    """Each --dataset kind reaches ot_cfm.images.datasets; the readers themselves are tested in tests/ot_cfm."""
    import gzip
    import pickle

    import numpy as np
    from PIL import Image

    images = load_script("examples/images.py")
    pixels = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    for prefix, gz in (("train", True), ("t10k", False)):
        image_file = np.array([2051, 3, 28, 28], dtype=">i4").tobytes() + pixels.tobytes()
        label_file = np.array([2049, 3], dtype=">i4").tobytes() + bytes([4, 0, 9])
        for name, raw in ((f"{prefix}-images-idx3-ubyte", image_file), (f"{prefix}-labels-idx1-ubyte", label_file)):
            (tmp_path / "mnist" / (name + ".gz" if gz else name)).parent.mkdir(exist_ok=True)
            (tmp_path / "mnist" / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    data = images.load_images("mnist", tmp_path / "mnist", torch.Generator())
    assert data.train_images.shape == data.held_out_images.shape == (3, 1, 28, 28)
    assert torch.equal(data.train_images[:, 0], torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1))
    assert data.train_labels.tolist() == [4, 0, 9]

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = np.random.default_rng(0).integers(0, 256, (2, 3072), dtype=np.uint8)  # R plane, G plane, B plane
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": rows, b"labels": [0, 1]}, protocol=2))
    data = images.load_images("cifar10", tmp_path / "cifar", torch.Generator())
    assert data.train_images.shape == (10, 3, 32, 32) and data.held_out_images.shape == (2, 3, 32, 32)
    green = torch.from_numpy(rows[1, 1024:2048].reshape(32, 32).astype(np.float32) / 127.5 - 1)
    assert torch.equal(data.held_out_images[1, 1], green)

    np.save(tmp_path / "grey.npy", pixels.repeat(4, axis=0))  # (12, 28, 28) uint8
    data = images.load_images("npy", tmp_path / "grey.npy", torch.Generator().manual_seed(0), held_out_fraction=0.25)
    assert data.train_images.shape == (9, 1, 28, 28) and data.held_out_images.shape == (3, 1, 28, 28)

    for label in ("a", "b"):
        for k in range(3):
            (tmp_path / "faces" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[k, : 10 + k, :12]).save(tmp_path / "faces" / label / f"{k}.png")
    data = images.load_images("folder", tmp_path / "faces", torch.Generator(), image_size=8)
    assert data.class_names == ("a", "b") and data.shape == (1, 8, 8) and data.held_out_images.shape[0] == 1


def test_assignment_warm_start_keeps_the_optimum():
    """Column shifts (exact or half-batch duals) must leave scipy's optimal permutation unchanged."""
    import subprocess
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/assignment_warm_start.py"), "--batch-sizes", "64",
                          "--dims", "2", "8", "--reps", "1"], capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| 64 |")]
    assert len(rows) == 4 and "another permutation" not in out  # timing and dual-noise tables, d = 2 and 8


def test_sinkhorn_benchmark_runs_both_solvers_to_the_tolerance():
    """The comparison is fair only if POT's stopping rule also reaches the L1 marginal tolerance."""
    import subprocess
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/sinkhorn.py"), "--batch-sizes", "48", "--dims", "2",
                          "--epsilons", "0.1", "--tol", "1e-3", "--reps", "1"],
                         capture_output=True, text=True, check=True).stdout
    row = [line for line in out.splitlines() if line.startswith("| 48 |")]
    assert len(row) == 1
    errors = [float(e) for e in row[0].split("|")[-2].split(",")]
    assert max(errors) <= 1e-3
