"""Data samplers: moments of each toy distribution from its construction, seeding, dtype/device, bad input.

Moment checks use N = 1e5 seeded draws and a tolerance of 5 Monte Carlo standard errors (estimated
from the draws themselves), so a correct sampler would fail one check with probability about 6e-7.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import torch

from ot_cfm.data import TOY_DATASETS, TensorSampler, gaussian_sampler, load_array_dataset, sample_toy, toy_sampler

N = 100_000
EIGHT_GAUSSIANS_VAR = 0.1**0.5  # per-coordinate variance: cluster std 0.1 ** 0.25, squared
CIRCLES_VAR = 9 * 0.08**2  # per-coordinate noise variance after the final scaling by 3


def draw(name, seed=0, n=N):
    return sample_toy(name, n, torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_mean(values, expected, what):
    """The sample mean of i.i.d. values lies within 5 standard errors of its expectation."""
    values = values.double().flatten()
    mean, se = values.mean().item(), values.std().item() / math.sqrt(values.numel())
    assert abs(mean - expected) <= 5 * se, f"{what}: mean {mean:.5f}, expected {expected:.5f} +- {5 * se:.5f}"


def assert_fraction(mask, p, what):
    """The fraction of a Bernoulli(p) mask lies within 5 binomial standard errors of p."""
    frac, se = mask.double().mean().item(), math.sqrt(p * (1 - p) / mask.numel())
    assert abs(frac - p) <= 5 * se, f"{what}: fraction {frac:.5f}, expected {p:.5f} +- {5 * se:.5f}"


# ---------------------------------------------------------------- moments of each toy distribution


def check_gaussian(x):
    """N(0, I): zero means, unit variances, zero covariance."""
    assert_mean(x[:, 0], 0.0, "E x")
    assert_mean(x[:, 1], 0.0, "E y")
    assert_mean(x[:, 0] ** 2, 1.0, "E x^2")
    assert_mean(x[:, 1] ** 2, 1.0, "E y^2")
    assert_mean(x[:, 0] * x[:, 1], 0.0, "E xy")


def check_eight_gaussians(x):
    """Centres 5 (cos k pi/4, sin k pi/4), per-coordinate variance sqrt(0.1): E x = 0, E|x|^2 = 25 + 2 sqrt(0.1),
    each cluster (nearest centre by angle) has mass 1/8, and around its centre E|x - c|^2 = 2 sqrt(0.1),
    split evenly between the radial and tangential directions. Points nearer another centre (tangential
    noise above 5 sin(pi/8) = 3.4 std) bias the last three by under 1e-3, a tenth of their tolerance."""
    assert_mean(x[:, 0], 0.0, "E x")
    assert_mean(x[:, 1], 0.0, "E y")
    assert_mean(x.pow(2).sum(1), 25 + 2 * EIGHT_GAUSSIANS_VAR, "E|x|^2")
    k = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (math.pi / 4)).long() % 8
    for j in range(8):
        assert_fraction(k == j, 1 / 8, f"mass of cluster {j}")
    angle = k * (math.pi / 4)
    radial = torch.stack([angle.cos(), angle.sin()], dim=1)
    noise = x - 5 * radial
    assert_mean(noise.pow(2).sum(1), 2 * EIGHT_GAUSSIANS_VAR, "E|x - c|^2")
    assert_mean((noise * radial).sum(1) ** 2, EIGHT_GAUSSIANS_VAR, "radial variance")
    tangent = torch.stack([-angle.sin(), angle.cos()], dim=1)
    assert_mean((noise * tangent).sum(1) ** 2, EIGHT_GAUSSIANS_VAR, "tangential variance")


def check_moons(x):
    """Before the map 3p - 1, with theta ~ U(0, pi) (E cos = E sin cos = 0, E sin = 2/pi, E cos^2 = E sin^2 = 1/2)
    and noise variance 0.04: the upper moon (cos, sin) and the lower one (1 - cos, 1/2 - sin), each with
    probability 1/2, give mean (1/2, 1/4), Var x = 1.04 - 1/4 = 0.79, Var y = 0.6025 - 1/pi and
    Cov = 1/8 - 1/pi. After the map: mean (1/2, -1/4), (co)variances times 9."""
    mx, my = 0.5, -0.25
    assert_mean(x[:, 0], mx, "E x")
    assert_mean(x[:, 1], my, "E y")
    assert_mean((x[:, 0] - mx) ** 2, 9 * 0.79, "Var x")
    assert_mean((x[:, 1] - my) ** 2, 9 * (0.6025 - 1 / math.pi), "Var y")
    assert_mean((x[:, 0] - mx) * (x[:, 1] - my), 9 * (0.125 - 1 / math.pi), "Cov xy")


def check_checkerboard(x):
    """Uniform on the 8 squares of side 2 of [-4, 4]^2 with floor(x/2) + floor(y/2) even: every point in
    one (up to 1e-5, for float32 rounding onto an edge), each square mass 1/8, uniform inside a square."""

    def in_black_square(p):
        cell = torch.floor(p / 2)
        return (p.abs() <= 4).all(1) & (cell.sum(1) % 2 == 0)

    inside = torch.zeros(len(x), dtype=torch.bool)
    for shift in product((-1e-5, 0.0, 1e-5), repeat=2):
        inside |= in_black_square(x + torch.tensor(shift, dtype=x.dtype))
    assert inside.all(), f"{int((~inside).sum())} points outside the black squares, e.g. {x[~inside][:3].tolist()}"
    cell = torch.floor(x / 2).long()
    for cx, cy in product(range(-2, 2), repeat=2):
        if (cx + cy) % 2 == 0:
            assert_fraction((cell[:, 0] == cx) & (cell[:, 1] == cy), 1 / 8, f"mass of square {(cx, cy)}")
    offset = x / 2 - torch.floor(x / 2)  # position inside the square, U(0, 1) in each coordinate
    assert_mean(offset, 0.5, "mean position in square")
    assert_mean((offset - 0.5) ** 2, 1 / 12, "variance of position in square")
    assert_mean((offset[:, 0] - 0.5) * (offset[:, 1] - 0.5), 0.0, "covariance of position in square")


def check_circles(x):
    """Radii 3 and 1.5 (1 and 0.5 scaled by 3) with probability 1/2 each, per-coordinate noise variance
    9 * 0.08^2: E x = 0, E|x|^2 = 9 (1 + 1/4) / 2 + 2 * 0.0576 exactly; split at |x| = 2.25 (3.1 noise
    std from each ring), half the points are outer, with E|x|^2 = r^2 + 2 * 0.0576 per ring; points
    crossing the split bias those by about 1e-3, under a tenth of their tolerance."""
    assert_mean(x[:, 0], 0.0, "E x")
    assert_mean(x[:, 1], 0.0, "E y")
    sq = x.pow(2).sum(1)
    assert_mean(sq, 9 * 0.625 + 2 * CIRCLES_VAR, "E|x|^2")
    outer = sq.sqrt() > 2.25
    assert_fraction(outer, 0.5, "outer ring")
    assert_mean(sq[outer], 9 + 2 * CIRCLES_VAR, "E|x|^2 on the outer ring")
    assert_mean(sq[~outer], 2.25 + 2 * CIRCLES_VAR, "E|x|^2 on the inner ring")


def check_swissroll(x):
    """(t cos t, t sin t) + N(0, I), divided by 5, t ~ U(1.5 pi, 4.5 pi): integrating by parts,
    E t cos t = 6 pi / 3 pi = 2 and E t sin t = 2 / 3 pi; E|x|^2 = (E t^2 + 2) / 25 with
    E t^2 = (a^2 + ab + b^2) / 3 = 9.75 pi^2."""
    assert_mean(x[:, 0], 2 / 5, "E x")
    assert_mean(x[:, 1], 2 / (3 * math.pi) / 5, "E y")
    assert_mean(x.pow(2).sum(1), (9.75 * math.pi**2 + 2) / 25, "E|x|^2")


def check_scurve(x):
    """scikit-learn's S curve (sin t, 2 u, sign(t) (cos t - 1)) + 0.1 N(0, I_3), t ~ U(-3 pi / 2, 3 pi / 2), projected
    on its first and last coordinates and scaled by c so that the pooled entries have std 7 (torchcfm's scaling):
    E x = E z = 0 (odd in t); E sin^2 t = 1/2, E cos t = -2 / (3 pi), E cos^2 t = 1/2, so E x^2 = c^2 0.51 and
    E z^2 = c^2 (1.51 + 4 / (3 pi)), whose mean is 49; E x z = c^2 E sin|t| (cos t - 1) = -c^2 / (3 pi)."""
    c2 = 49 / (1.01 + 2 / (3 * math.pi))
    assert_mean(x[:, 0], 0.0, "E x")
    assert_mean(x[:, 1], 0.0, "E z")
    assert_mean(x[:, 0] ** 2, c2 * 0.51, "E x^2")
    assert_mean(x[:, 1] ** 2, c2 * (1.51 + 4 / (3 * math.pi)), "E z^2")
    assert_mean(x.pow(2).mean(1), 49.0, "pooled second moment")
    assert_mean(x[:, 0] * x[:, 1], -c2 / (3 * math.pi), "E xz")


MOMENT_CHECKS = {"gaussian": check_gaussian, "8gaussians": check_eight_gaussians, "moons": check_moons,
                 "checkerboard": check_checkerboard, "circles": check_circles, "swissroll": check_swissroll,
                 "scurve": check_scurve}


def test_every_toy_dataset_has_a_moment_check():
    """A dataset added to (or renamed in) TOY_DATASETS must get its own check here."""
    assert set(MOMENT_CHECKS) == set(TOY_DATASETS)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_moments_match_the_construction(name):
    x = draw(name, seed=TOY_DATASETS.index(name))
    assert x.shape == (N, 2) and torch.isfinite(x).all()
    MOMENT_CHECKS[name](x)


# ---------------------------------------------------------------- seeding, dtype, device, bad input


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_draws_follow_the_generator_only(name):
    """Same seed: identical draws; another seed or the next draw: different ones; the global RNG is untouched."""
    state = torch.get_rng_state()
    g = torch.Generator().manual_seed(7)
    first, second = sample_toy(name, 500, g), sample_toy(name, 500, g)
    assert torch.equal(first, sample_toy(name, 500, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, second)
    assert not torch.equal(first, sample_toy(name, 500, torch.Generator().manual_seed(8)))
    assert torch.equal(torch.get_rng_state(), state), "a draw with a generator used the global RNG"


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_dtype_and_device_are_respected(name):
    """Drawn in float32 on the CPU and then converted: float64 output is the float32 draw cast exactly."""
    def seeded():
        return torch.Generator().manual_seed(3)

    x32 = sample_toy(name, 64, seeded())
    assert x32.dtype == torch.float32 and x32.shape == (64, 2) and x32.device.type == "cpu"
    x64 = sample_toy(name, 64, seeded(), dtype=torch.float64)
    assert x64.dtype == torch.float64 and torch.equal(x64, x32.double())
    sampler = toy_sampler(name, dtype=torch.float64)
    assert torch.equal(sampler(64, seeded()), x64)
    assert sample_toy(name, 64, seeded(), device="meta").device.type == "meta"
    assert toy_sampler(name, device="meta")(64, seeded()).device.type == "meta"


def test_toy_bad_input_raises():
    with pytest.raises(ValueError, match="unknown toy dataset"):
        sample_toy("spirals", 10)
    with pytest.raises(ValueError, match="unknown toy dataset"):
        toy_sampler("spirals")
    with pytest.raises(ValueError, match="positive"):
        sample_toy("moons", 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA generator")
def test_toy_rejects_a_cuda_generator():
    with pytest.raises(ValueError, match="CPU"):
        sample_toy("moons", 10, torch.Generator(device="cuda").manual_seed(0))


def test_gaussian_sampler_shape_moments_and_seeding():
    """N(0, I) in shape (3, 4): all N * 12 entries i.i.d. with mean 0 and variance 1; same seed, same draw."""
    sampler = gaussian_sampler((3, 4), dtype=torch.float64)
    x = sampler(N // 12, torch.Generator().manual_seed(0))
    assert x.shape == (N // 12, 3, 4) and x.dtype == torch.float64
    assert_mean(x, 0.0, "mean")
    assert_mean(x**2, 1.0, "variance")
    assert_mean(x[:, 0, 0] * x[:, 2, 3], 0.0, "covariance of two entries")
    assert torch.equal(x, sampler(N // 12, torch.Generator().manual_seed(0)))
    assert not torch.equal(x, sampler(N // 12, torch.Generator().manual_seed(1)))
    assert gaussian_sampler((2,), device="meta")(5).device.type == "meta"


# ---------------------------------------------------------------- TensorSampler


def test_tensor_sampler_draws_rows_uniformly_with_replacement():
    """Every draw is a whole row of the data; 20,000 draws from 10 rows (more draws than rows: with
    replacement) hit each row with frequency 1/10 within 5 binomial standard errors."""
    data = torch.arange(10 * 4, dtype=torch.float32).reshape(10, 1, 2, 2)  # row r holds 4r .. 4r + 3
    labels = torch.arange(10) * 11
    sampler = TensorSampler(data, labels)
    rows = sampler(20_000, torch.Generator().manual_seed(0))
    assert rows.shape == (20_000, 1, 2, 2) and rows.dtype == data.dtype
    which = (rows[:, 0, 0, 0] / 4).long()
    assert torch.equal(rows, data[which]), "a returned row is not a row of the data"
    for r in range(10):
        assert_fraction(which == r, 1 / 10, f"frequency of row {r}")
    # indices() is the same draw: it pairs data rows with their labels
    idx = sampler.indices(20_000, torch.Generator().manual_seed(0))
    assert torch.equal(data[idx], rows) and torch.equal(sampler.labels[idx], labels[which])


def test_tensor_sampler_seeding_and_bad_input():
    data = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    sampler = TensorSampler(data)
    a = sampler(50, torch.Generator().manual_seed(5))
    assert torch.equal(a, sampler(50, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, sampler(50, torch.Generator().manual_seed(6)))
    with pytest.raises(ValueError, match="empty"):
        TensorSampler(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="differ in length"):
        TensorSampler(data, torch.arange(5))


# ---------------------------------------------------------------- load_array_dataset: rows (N, d) of a file


def rows_of(ds):
    """Every row of both splits, as a set of tuples, with its label when there are labels."""
    pairs = [(ds.train, ds.train_labels), (ds.held_out, ds.held_out_labels)]
    return sorted(tuple(r.tolist()) + (() if y is None else (int(y[i]),)) for x, y in pairs for i, r in enumerate(x))


ARRAY = np.arange(30, dtype=np.float64).reshape(10, 3) * [1.0, -2.0, 0.5]  # row r: (3r, -2(3r+1), (3r+2)/2)
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])


def test_array_dataset_reads_npy_npz_and_csv_with_labels(tmp_path):
    expected = sorted(tuple(r) + (int(y),) for r, y in zip(ARRAY.tolist(), LABELS))
    np.savez(tmp_path / "a.npz", x=ARRAY, y=LABELS)
    np.savez(tmp_path / "b.npz", features=ARRAY.astype(np.float32), labels=LABELS)  # the only other array
    table = np.column_stack([ARRAY[:, :1], LABELS, ARRAY[:, 1:]])  # the label column in the middle
    np.savetxt(tmp_path / "h.csv", table, delimiter=",", header="u,kind,v,w", comments="")
    np.savetxt(tmp_path / "n.csv", table, delimiter=",")
    for name, column in (("a.npz", None), ("b.npz", None), ("h.csv", "kind"), ("n.csv", 1), ("n.csv", "-3")):
        ds = load_array_dataset(tmp_path / name, labels=column)
        assert ds.name == name and ds.dim == 3 and ds.num_classes == 3, name
        assert ds.train.dtype == torch.float32 and ds.train_labels.dtype == torch.int64
        assert (ds.train.shape[0], ds.held_out.shape[0]) == (8, 2), name
        assert rows_of(ds) == expected, name
        assert ds.mean is None and ds.std is None
    np.save(tmp_path / "i.npy", np.arange(12).reshape(6, 2))  # integers are read as numbers
    ds = load_array_dataset(tmp_path / "i.npy", held_out_fraction=0.5)
    assert ds.train_labels is None and ds.num_classes is None
    assert rows_of(ds) == [(float(2 * r), float(2 * r + 1)) for r in range(6)]


def test_array_dataset_split_is_disjoint_and_seeded(tmp_path):
    np.save(tmp_path / "a.npy", ARRAY)
    a, b = (load_array_dataset(tmp_path / "a.npy", seed=3) for _ in range(2))
    assert torch.equal(a.train, b.train) and torch.equal(a.held_out, b.held_out)
    train, held = {tuple(r.tolist()) for r in a.train}, {tuple(r.tolist()) for r in a.held_out}
    assert not train & held and len(train | held) == 10
    others = [load_array_dataset(tmp_path / "a.npy", seed=s).held_out for s in range(4, 10)]
    assert any(not torch.equal(o, a.held_out) for o in others), "the split does not depend on the seed"


def test_array_dataset_standardisation_is_exact_and_reversible(tmp_path):
    data = np.column_stack([ARRAY, np.full(10, 7.0)])  # a constant column keeps std 1
    np.save(tmp_path / "a.npy", data)
    ds = load_array_dataset(tmp_path / "a.npy", standardize=True)
    every = torch.cat([ds.train, ds.held_out]).double()
    torch.testing.assert_close(every.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(every.std(0, correction=0), torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(ds.mean, torch.tensor(data.mean(0), dtype=torch.float32))
    torch.testing.assert_close(ds.std, torch.tensor([*data.std(0)[:3], 1.0], dtype=torch.float32))
    back = ds.to_original_units(torch.cat([ds.train, ds.held_out]))
    assert sorted(tuple(round(v, 4) for v in r) for r in back.tolist()) == [tuple(r) for r in data.tolist()]


@pytest.mark.parametrize("write, options, message", [
    (None, {}, "does not exist"),
    (lambda p: np.save(p, np.zeros(5)), {}, r"shape \(5,\); expected a 2D array"),
    (lambda p: np.save(p, np.zeros((1, 3))), {}, "at least 2 rows"),
    (lambda p: np.save(p, np.array([[1.0, 2.0], [np.nan, 0.0]])), {}, "row 1 holds NaN or inf"),
    (lambda p: np.save(p, np.array([[1.0, 2.0], [np.inf, 0.0]])), {}, "NaN or inf"),
    (lambda p: np.save(p, np.array([["a", "b"], ["c", "d"]])), {}, "expected numbers"),
    (lambda p: p.with_suffix(".csv").write_text("a,b\n1,2\n3,x\n"), {}, "line 3, column 2: 'x' is not a number"),
    (lambda p: p.with_suffix(".csv").write_text("1,2,0.5\n3,4,1\n"), {"labels": 2}, "labels are not integers"),
    (lambda p: p.with_suffix(".csv").write_text("1,2,-1\n3,4,1\n"), {"labels": 2}, "expected class indices >= 0"),
    (lambda p: p.with_suffix(".csv").write_text("a,b\n1,2\n3,4\n"), {"labels": "c"}, "no column named 'c'"),
    (lambda p: np.savez(p.with_suffix(".npz"), x=np.zeros((4, 2)), y=np.arange(3)), {}, r"expected one per row"),
    (lambda p: np.savez(p.with_suffix(".npz"), x=np.zeros((4, 2)), y=np.full(4, 0.5)), {}, "not integers"),
    (lambda p: np.savez(p.with_suffix(".npz"), p=np.zeros((4, 2)), q=np.zeros((4, 2))), {}, "under 'x' or 'data'"),
    (lambda p: np.save(p, np.zeros((4, 2))), {"labels": "y"}, "holds one array and no labels"),
    (lambda p: p.with_suffix(".txt").write_text("1,2\n"), {}, "expected one of .npy, .npz, .csv"),
    (lambda p: p.write_bytes(b"not an array"), {}, "not a readable .npy / .npz"),
])
def test_array_dataset_errors_name_the_file(tmp_path, write, options, message):
    path = tmp_path / "bad.npy"
    if write is not None:
        write(path)
        path = next(tmp_path.iterdir())
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        load_array_dataset(path, **options)
    assert str(path) in str(info.value)
