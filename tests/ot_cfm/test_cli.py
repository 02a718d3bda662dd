import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ot_cfm.cli import main
from ot_cfm.training.checkpoint import read_checkpoint


@pytest.mark.parametrize("command", [[], ["train"], ["sample"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "usage: ot-cfm" in printed
    assert "(default: None)" not in printed  # options without a default say what leaving them out means


def test_train_then_sample_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--steps", "60", "--batch-size", "64", "--eval-samples", "200", "--width", "32",
                 "--checkpoint-every", "30", "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 60 and metrics["coupler"] == "exact"
    for key in ("w2/euler-1", "w2/euler-2", "w2/euler-4", "w2/euler-8", "w2/dopri5", "npe", "w2_floor"):
        assert metrics[key] == metrics[key] and metrics[key] >= 0, key  # finite, not NaN
    assert metrics["nfe/euler-4"] == 4.0
    assert (out / "samples.png").stat().st_size > 10_000 and (out / "checkpoint.pt").exists()
    printed = capsys.readouterr().out
    assert "euler-1" in printed and "dopri5" in printed

    code = main(["sample", str(out / "checkpoint.pt"), "--n", "100", "--solver", "euler", "--steps", "4",
                 "--out", str(tmp_path / "s")])
    assert code == 0
    assert (tmp_path / "s.png").exists() and (tmp_path / "s.pt").exists()


def test_resume_with_other_configuration_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--steps", "10", "--batch-size", "32", "--eval-samples", "100", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert main([*args[:-1], "--lr", "0.5", "--resume", "--no-progress"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_pairs_with_replacement_reach_the_coupler_and_the_record(tmp_path, capsys, monkeypatch):
    """--pairs-with-replacement wraps the coupler in ResampledCoupler; a resume without it is another run."""
    from ot_cfm.training import Trainer

    couplers = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, **kw: couplers.append(self.matcher.coupler) or fit(self, **kw))
    out = tmp_path / "run"
    args = ["train", *SMALL, "--out", str(out), "--pairs-with-replacement"]
    assert main(args) == 0
    assert repr(couplers[0]) == "ResampledCoupler(ExactOTCoupler(backend='auto'))"
    assert strict_json(out / "metrics.json")["pairs_with_replacement"] is True
    assert read_checkpoint(out / "checkpoint.pt")["metadata"]["pairs_with_replacement"] is True
    capsys.readouterr()
    assert main([*args[:-1], "--resume"]) == 2
    assert "another configuration" in capsys.readouterr().err
    # without the option the metadata is as before it existed: older checkpoints still resume
    assert main(["train", *SMALL, "--out", str(tmp_path / "plain")]) == 0
    assert "pairs_with_replacement" not in read_checkpoint(tmp_path / "plain" / "checkpoint.pt")["metadata"]


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "ot_cfm.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout


def strict_json(path):
    return json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(f"{token} in {path}"))


SMALL = ["--steps", "10", "--batch-size", "32", "--width", "16", "--eval-samples", "100", "--no-progress"]


def test_resuming_a_finished_run_says_so_and_keeps_its_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    metrics = (out / "metrics.json").read_text()
    first = strict_json(out / "metrics.json")
    assert first["steps_this_call"] == 10 and first["final_loss"] > 0
    capsys.readouterr()
    assert main(["train", *SMALL, "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"the run in {out} had already finished at step 10" in printed and "trained" not in printed
    assert (out / "metrics.json").read_text() == metrics


def test_finished_run_without_valid_metrics_is_evaluated_again(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    first = strict_json(out / "metrics.json")
    (out / "metrics.json").write_text('{"final_loss": NaN}\n')  # as earlier versions wrote on resume
    assert main(["train", *SMALL, "--out", str(out), "--resume"]) == 0
    again = strict_json(out / "metrics.json")
    assert again["final_loss"] == first["final_loss"] and again["steps"] == 10 and again["steps_this_call"] == 0
    assert again["w2/dopri5"] == first["w2/dopri5"]  # the same evaluation draws
    assert "already finished" in capsys.readouterr().out


def test_cpu_parallelism_is_automatic_by_default():
    from ot_cfm.cli import build_parser
    args = build_parser().parse_args(["train"])
    assert args.workers == "auto" and args.threads is None
    args = build_parser().parse_args(["train", "--workers", "3", "--threads", "2"])
    assert args.workers == 3 and args.threads == 2
    for bad in (["--workers", "-1"], ["--workers", "some"], ["--threads", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", *bad])


def test_train_reports_the_parallelism_it_chose(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--coupler", "independent", "--out", str(out)]) == 0
    assert "with 0 workers and 1 torch thread;" in capsys.readouterr().out
    metrics = strict_json(out / "metrics.json")
    assert metrics["workers"] == 0 and metrics["threads"] == 1


def test_sample_from_a_checkpoint_with_a_nan_weight_ends_with_an_error(tmp_path, capsys):
    from ot_cfm.training.checkpoint import read_checkpoint, write_checkpoint

    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    state = read_checkpoint(out / "checkpoint.pt")
    first = next(iter(state["model"]))
    state["model"][first].view(-1)[0] = float("nan")
    write_checkpoint(out / "checkpoint.pt", state)
    capsys.readouterr()
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "50", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "NaN or inf" in err and "dopri5" in err
    assert not (tmp_path / "s.pt").exists()


def test_sample_max_nfe_is_passed_to_the_adaptive_solver(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "50", "--max-nfe", "3", "--out", str(tmp_path / "s")]) == 2
    assert "max_nfe = 3" in capsys.readouterr().err


SAMPLE_KEYS = ("x0", "x1", "labels", "nfe")
IMAGE_KEYS = ("frechet_distance", "w2", "coverage_entropy", "least_frequent_share", "nfe")
DIGITS = ["train", "--dataset", "digits", "--model", "mlp", "--width", "32", "--depth", "2", "--steps", "20",
          "--batch-size", "64", "--eval-samples", "120",
          "--eval-solvers", "euler-1,euler-2,euler-4,euler-8,dopri5", "--classifier-steps", "20", "--workers", "0", "--no-progress"]


@pytest.fixture
def classifier_cache(tmp_path, monkeypatch):
    from ot_cfm.images import CLASSIFIER_CACHE_ENV

    monkeypatch.setenv(CLASSIFIER_CACHE_ENV, str(tmp_path / "classifiers"))
    return tmp_path / "classifiers"


@pytest.fixture
def grids(monkeypatch):
    """Records the arguments of every sample grid drawn."""
    import ot_cfm.evaluation.plotting

    drawn, original = [], ot_cfm.evaluation.plotting.plot_image_grid

    def record(path, images, **kwargs):
        drawn.append({"path": path, "images": images, **kwargs})
        return original(path, images, **kwargs)

    monkeypatch.setattr(ot_cfm.evaluation.plotting, "plot_image_grid", record)
    return drawn


def test_digits_run_writes_checkpoint_image_metrics_and_grids(tmp_path, classifier_cache, grids, capsys):
    out = tmp_path / "run"
    assert main([*DIGITS, "--eval-every", "10", "--out", str(out)]) == 0
    metrics = strict_json(out / "metrics.json")
    assert metrics["dataset"] == "digits" and metrics["steps"] == 20 and metrics["conditional"] is False
    for solver in ("euler-1", "euler-2", "euler-4", "euler-8", "dopri5"):
        for key in IMAGE_KEYS:
            assert metrics[f"{key}/{solver}"] >= 0, f"{key}/{solver}"
        assert f"conditional_accuracy/{solver}" not in metrics
    assert metrics["nfe/euler-4"] == 4 and 0 < metrics["classifier_held_out_accuracy"] <= 1
    assert list(classifier_cache.glob("classifier-*.pt"))  # the classifier went to the cache the variable names
    for png in (out / "samples.png", out / "grids" / "step_000010.png", out / "grids" / "step_000020.png"):
        assert png.read_bytes().startswith(b"\x89PNG"), png
    assert [g["images"].shape for g in grids] == [(64, 1, 8, 8)] * 3 and grids[0]["row_labels"] is None
    assert "step 10" in grids[0]["title"] and "NFE 8" in grids[0]["title"]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [row for row in logged if "frechet_distance/euler-8" in row]
    assert [row["step"] for row in evaluated] == [10, 20]
    assert evaluated[-1]["frechet_distance/euler-8"] == pytest.approx(metrics["frechet_distance/euler-8"])
    # the final grid and the last training grid share the fixed noise and the weights
    assert torch.equal(grids[1]["images"], grids[2]["images"])
    printed = capsys.readouterr().out
    assert "| euler-1 | 1 |" in printed and "| dopri5 |" in printed

    assert main(["sample", str(out / "checkpoint.pt"), "--n", "30", "--solver", "euler", "--steps", "2",
                 "--out", str(tmp_path / "s")]) == 0
    drawn = read_checkpoint(tmp_path / "s.pt", keys=SAMPLE_KEYS)
    assert drawn["x1"].shape == (30, 1, 8, 8) and drawn["nfe"] == 2 and drawn["labels"] is None
    assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG") and grids[-1]["images"].shape[0] == 30


def test_conditional_digits_run_has_one_grid_row_per_class(tmp_path, classifier_cache, grids):
    out = tmp_path / "run"
    assert main([*DIGITS, "--conditional", "--guidance", "2", "--out", str(out)]) == 0
    metrics = strict_json(out / "metrics.json")
    assert metrics["conditional"] is True and metrics["label_dropout"] == 0.1 and metrics["guidance"] == 2.0
    for solver in ("euler-1", "euler-8", "dopri5"):
        assert 0 <= metrics[f"conditional_accuracy/{solver}"] <= 1
    (final,) = grids
    assert final["row_labels"] == [str(k) for k in range(10)] and final["images"].shape == (80, 1, 8, 8)
    assert "guidance 2" in final["title"] and (out / "samples.png").exists()

    assert main(["sample", str(out / "checkpoint.pt"), "--n", "25", "--solver", "euler", "--steps", "2",
                 "--out", str(tmp_path / "s")]) == 0
    drawn = read_checkpoint(tmp_path / "s.pt", keys=SAMPLE_KEYS)
    assert torch.equal(drawn["labels"], torch.arange(25) % 10)
    # 25 samples hold at least 2 of each class: two columns, one row per class, each showing its class
    assert grids[-1]["columns"] == 2 and grids[-1]["images"].shape[0] == 20
    assert torch.equal(grids[-1]["images"][:2], drawn["x1"][[0, 10]])
    assert (tmp_path / "s.png").exists()


def test_dataset_with_toy_options_is_refused_clearly(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*DIGITS, "--source", "moons", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--source" in err and "--dataset digits" in err and "drop --source" in err
    assert not (out / "checkpoint.pt").exists()
    assert main(["train", *SMALL, "--conditional", "--out", str(out)]) == 2
    assert "--conditional apply to image runs only; add --dataset" in capsys.readouterr().err
    assert main([*DIGITS, "--guidance", "3", "--out", str(out)]) == 2
    assert "add --conditional" in capsys.readouterr().err


def test_inception_weights_add_the_fid_at_each_solver(tmp_path, classifier_cache, monkeypatch, capsys):
    import ot_cfm.images.frechet as image_metrics

    weights = tmp_path / "inception.pth"
    assert main([*DIGITS, "--inception-weights", str(weights), "--out", str(tmp_path / "none")]) == 2
    assert f"--inception-weights {weights}: no such file" in capsys.readouterr().err

    weights.write_bytes(b"stands for the weights")
    calls = []

    def fid(generated, reference, *, inception_weights):  # the FID itself is tested in test_image_metrics
        calls.append((generated.shape, reference.shape, inception_weights))
        return image_metrics.InceptionFID(float(len(calls)), "FID", generated.shape[0], reference.shape[0])

    monkeypatch.setattr(image_metrics, "inception_fid", fid)
    out = tmp_path / "run"
    assert main([*DIGITS, "--inception-weights", str(weights), "--out", str(out)]) == 0
    metrics = strict_json(out / "metrics.json")
    assert [metrics[f"fid/{s}"] for s in ("euler-1", "euler-2", "euler-4", "euler-8", "dopri5")] == [1, 2, 3, 4, 5]
    assert calls[0] == ((120, 1, 8, 8), (359, 1, 8, 8), str(weights))  # every generated image, the held-out set
    assert "| FID |" in capsys.readouterr().out


def test_adaptive_solver_failure_leaves_null_metrics_and_says_why(tmp_path, classifier_cache, monkeypatch, capsys):
    import ot_cfm.images.sampling as image_sampling
    import ot_cfm.solvers.ode as sampling

    original = sampling.sample

    def stiff(field, x0, *, solver, **kwargs):
        if solver == "dopri5":
            raise sampling.IntegrationError("more than max_nfe = 1000 field evaluations")
        return original(field, x0, solver=solver, **kwargs)

    monkeypatch.setattr(image_sampling, "sample", stiff)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match=r"dopri5: no samples \(more than max_nfe = 1000"):
        assert main([*DIGITS, "--out", str(out)]) == 0
    metrics = strict_json(out / "metrics.json")
    assert metrics["frechet_distance/dopri5"] is None and metrics["nfe/dopri5"] is None
    assert metrics["frechet_distance/euler-8"] >= 0
    assert "| dopri5 |" not in capsys.readouterr().out


def test_sample_reports_the_nfe_of_the_solve_not_of_the_plotted_paths(tmp_path, capsys):
    from ot_cfm.cli import _load_sampling_model
    from ot_cfm.data import toy_sampler
    from ot_cfm.solvers.ode import sample

    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    assert main(["sample", str(out / "checkpoint.pt"), "--n", "100", "--out", str(tmp_path / "s")]) == 0
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    model, meta = _load_sampling_model(out / "checkpoint.pt")
    direct = sample(model, toy_sampler(meta["source"])(100, torch.Generator().manual_seed(0)), solver="dopri5")
    assert saved["nfe"] == direct.nfe and torch.allclose(saved["x1"], direct.x)
    assert f"NFE {direct.nfe})" in capsys.readouterr().out


# ---------------------------------------------------------------- --data: rows (N, d) of a file

DATA_SMALL = [*SMALL, "--workers", "0", "--checkpoint-every", "10"]


def write_table(tmp_path, n=120):
    """A CSV with a header and a label column between the features, and an NPY of the same features (n, 3)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 5.0, 2.0]) + torch.tensor([10, 0, -3])
    y = (x[:, 0] > 10).long()
    lines = ["a,cls,b,c"] + [f"{r[0]!r},{int(k)},{r[1]!r},{r[2]!r}" for r, k in zip(x.tolist(), y)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    np.save(tmp_path / "d.npy", x.numpy())
    return x, y


def test_train_on_data_files_then_sample_in_the_files_units(tmp_path, capsys):
    from ot_cfm.cli import _load_sampling_model
    from ot_cfm.models import guided_field
    from ot_cfm.solvers.ode import sample

    x, _ = write_table(tmp_path)
    npy_run = tmp_path / "npy"
    assert main(["train", *DATA_SMALL, "--data", str(tmp_path / "d.npy"), "--out", str(npy_run)]) == 0
    metrics = strict_json(npy_run / "metrics.json")
    assert (metrics["data"], metrics["dim"], metrics["train_rows"], metrics["held_out_rows"]) == ("d.npy", 3, 96, 24)
    assert metrics["w2/dopri5"] >= 0 and metrics["w2_floor"] >= 0 and metrics["conditional"] is False
    assert (npy_run / "checkpoint.pt").exists() and (npy_run / "samples.png").exists()

    csv_run = tmp_path / "csv"
    assert main(["train", *DATA_SMALL, "--data", str(tmp_path / "d.csv"), "--label-column", "cls", "--standardize",
                 "--conditional", "--out", str(csv_run)]) == 0
    metrics = strict_json(csv_run / "metrics.json")
    assert metrics["dim"] == 3 and metrics["conditional"] is True and metrics["standardized"] is True
    meta = read_checkpoint(csv_run / "checkpoint.pt")["metadata"]
    assert meta["num_classes"] == 2 and meta["model"]["num_classes"] == 2 and meta["model"]["dim"] == 3
    torch.testing.assert_close(torch.tensor(meta["mean"]), x.mean(0).float())
    torch.testing.assert_close(torch.tensor(meta["std"]), x.std(0, correction=0).float())

    capsys.readouterr()
    assert main(["sample", str(csv_run / "checkpoint.pt"), "--n", "50", "--solver", "euler", "--steps", "4",
                 "--out", str(tmp_path / "s")]) == 0
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    assert saved["x1"].shape == (50, 3) and (tmp_path / "s.png").exists()
    model, _ = _load_sampling_model(csv_run / "checkpoint.pt")
    raw = sample(guided_field(model, torch.arange(50) % 2, 1.0), saved["x0"], solver="euler", steps=4).x
    torch.testing.assert_close(saved["x1"], raw * torch.tensor(meta["std"]) + torch.tensor(meta["mean"]))
    assert "in the units of d.csv" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "digits"], "cannot be combined with --dataset"),
    (["--source", "moons"], "cannot be combined with --source"),
    (["--conditional"], "--conditional needs labels"),
    (["--label-column", "nope"], "no column named 'nope'"),
])
def test_data_option_refuses_what_does_not_fit(tmp_path, capsys, extra, message):
    write_table(tmp_path, n=10)
    assert main(["train", *DATA_SMALL, "--data", str(tmp_path / "d.csv"), *extra, "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


def test_data_only_options_need_data(tmp_path, capsys):
    assert main(["train", *SMALL, "--standardize", "--out", str(tmp_path / "r")]) == 2
    assert "only --data runs take --standardize" in capsys.readouterr().err


def test_a_folder_holding_another_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", *SMALL, "--lr", "0.01", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing was written
    assert main(["train", *SMALL, "--lr", "0.01", "--out", str(out), "--overwrite"]) == 0
    assert (out / "checkpoint.pt").read_bytes() != before
