"""Quick modes of examples/digits.py and examples/cifar10.py: they finish, write what they say, their outputs
parse, and the numbers in them have the properties the full runs rest on."""

import json
import math

import pytest
import torch
from example_scripts import load_script

from ot_cfm.images import load_image_dataset
from ot_cfm.images.sampling import evaluation_noise
from ot_cfm.models import unet_for


def test_digits_quick(tmp_path):
    digits = load_script("examples/digits.py")
    out = tmp_path / "digits"
    result = digits.run(["--quick", "--out", str(out)])
    names = {"digits.md", "digits.json", "digits_grid_ot-cfm.png", "digits_grid_i-cfm.png", "digits_memorisation.png"}
    assert names <= {p.name for p in out.iterdir()}
    assert all(p.stat().st_size > 5_000 for p in result["figures"])

    written = json.loads((out / "digits.json").read_text())
    variants = [v.name for v in digits.VARIANTS]
    assert list(written["summary"]) == variants
    for name in variants:
        conditional = name.endswith("conditional")
        for solver in digits.SOLVERS:
            cell = written["summary"][name][solver]
            assert ("conditional_accuracy" in cell) == conditional
            assert all(math.isfinite(v) for pair in cell.values() for v in pair)
            assert cell["frechet_distance"][0] > 0 and cell["w2"][0] > 0
            assert 0 <= cell["coverage_entropy"][0] <= 1 and 0 <= cell["least_frequent_share"][0] <= 0.1 + 1e-12
        for k in (1, 2, 4, 8):  # Euler takes exactly k evaluations
            assert written["summary"][name][f"euler-{k}"]["nfe"] == [k, 0.0]
    assert len(written["runs"]) == len(variants) and all(r["train_seconds"] > 0 for r in written["runs"])
    icfm = [r for r in written["runs"] if r["variant"].startswith("I-CFM") and "conditional" not in r["variant"]]
    assert len(icfm) == 2 and all(r["field_error_t0"] > 0 for r in icfm)
    assert written["references"]["icfm_exact_one_step"] > written["references"]["frechet_distance"]

    # the exact field of the training images carries noise onto training images: distance 0, ratio 0;
    # 150 steps of training do not copy any training image
    memo = written["memorisation"]
    assert memo["exact"]["median_distance"] == 0 and memo["exact"]["share_below_half"] == 1
    assert memo["learned"]["median_distance"] > 0 and memo["learned"]["median_ratio"] > memo["exact"]["median_ratio"]

    table = (out / "digits.md").read_text()
    assert "| OT-CFM | " in table and "| torchcfm OT-CFM | " in table and "## conditional accuracy" in table
    assert "python examples/digits.py --quick" in table
    assert written["settings"]["steps"] == 150 and written["settings"]["seeds"] == [0]


def test_digits_summary_and_goal_lines_say_what_holds():
    digits = load_script("examples/digits.py")
    fd = {name: [1.0, 3.0] for name in (v.name for v in digits.VARIANTS)}  # per seed, every solver unless below

    def value(name, seed, solver):
        if name == "I-CFM" and solver == "euler-1":
            return [4.0, 6.0][seed]
        if name == "torchcfm OT-CFM" and solver == "dopri5":
            return [0.5, 1.5][seed]
        return fd[name][seed]

    runs = [{"variant": name, "seed": seed, "rows": [{"solver": s, "frechet_distance": value(name, seed, s), "w2": 1.0}
                                                      for s in digits.SOLVERS]}
            for seed in (0, 1) for name in fd]
    summary = digits.summarise(runs)
    assert summary["I-CFM"]["euler-1"]["frechet_distance"] == (5.0, math.sqrt(2.0))  # mean, sample std
    assert digits.paired_ratios(runs, "OT-CFM", "torchcfm OT-CFM", "dopri5") == [2.0, 2.0]
    lines = digits.goal_lines(summary, runs)
    assert "- OT-CFM vs I-CFM, euler-1: Fréchet distance 2.000 ± 1.414 vs 5.000 ± 1.414 (ratio 0.40): lower" in lines
    assert "- OT-CFM vs I-CFM, euler-2: Fréchet distance 2.000 ± 1.414 vs 2.000 ± 1.414 (ratio 1.00): NOT lower" in lines
    same, unique, across = lines[-3:]
    # twice torchcfm's Fréchet distance on both seeds: beyond the seeds' noise
    assert "dopri5 2.00; WORSE than torchcfm OT-CFM's at dopri5." in same and same.endswith("dopri5 2.00, 2.00")
    assert same.startswith("- OT-CFM, pairs with replacement / torchcfm OT-CFM") and across.startswith("- OT-CFM / ")
    assert "at or below torchcfm OT-CFM, no replacement's at every setting" in unique
    resampling = digits.resampling_lines(summary)
    assert "- I-CFM, pairs with replacement / I-CFM, Fréchet distance (classifier features): euler-1 0.40, " \
           "euler-2 1.00" in resampling[2]


def test_icfm_field_error_is_zero_for_the_exact_field_only():
    digits = load_script("examples/digits.py")
    data = load_image_dataset("digits")
    mean = data.train_images.mean(0)
    assert digits.icfm_field_error(lambda t, x: mean - x, data, 50, seed=0) < 1e-12
    x0 = evaluation_noise(50, data.shape, 0)
    assert digits.icfm_field_error(lambda t, x: -x, data, 50, seed=0) == pytest.approx(float(mean.square().mean()))
    assert digits.icfm_field_error(lambda t, x: x - mean, data, 50, seed=0) == pytest.approx(
        float((2 * (mean - x0)).square().mean()))


def test_above_within_seed_noise_is_not_worse():
    digits = load_script("examples/digits.py")
    assert digits.beyond_noise([1.11, 1.14, 1.08]) is True   # every seed above: worse
    assert digits.beyond_noise([1.05, 0.97, 1.00]) is False  # the seeds disagree
    assert digits.beyond_noise([1.3]) is None                # one seed: no noise estimate


def test_cifar10_quick(tmp_path):
    cifar = load_script("examples/cifar10.py")
    out = tmp_path / "cifar"
    report = cifar.run(["--quick", "--out", str(out)])
    written = json.loads((out / "cifar10.json").read_text())
    assert written == json.loads(json.dumps(report))
    # the memory estimate counts the model that was built: 20 bytes per parameter
    quick = sum(p.numel() for p in unet_for(cifar.SHAPE, **cifar.QUICK_UNET).parameters())
    assert written["memory"]["parameters"] == quick and written["memory"]["state_bytes"] == 20 * quick
    with torch.device("meta"):
        full = sum(p.numel() for p in unet_for((3, 32, 32)).parameters())
    assert written["memory_full_preset"]["parameters"] == full and 30e6 < full < 40e6  # torchcfm's CIFAR-10 UNet
    assert {(r["coupler"], r["mode"]) for r in written["measure"]} == {
        (c, m) for c in ("exact", "independent") for m in ("inline", "overlapped")}
    assert all(r["steps_per_second"] > 0 and r["peak_gib"] is None for r in written["measure"])
    assert written["train"]["step"] == 2 and math.isfinite(written["train"]["loss"])
    assert (out / "cifar10_samples.png").stat().st_size > 5_000
    assert "| exact | inline (inline) |" in (out / "cifar10_steps.md").read_text()
