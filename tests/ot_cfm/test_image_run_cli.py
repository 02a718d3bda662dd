"""A first image run on the command line: every phase reports progress, the evaluation is chosen from the run
(or switched off), ``sample`` writes beside its run and refuses to replace earlier samples, and the EMA warm-up
can be turned off to resume runs written before it."""

import json

import pytest

from ot_cfm.cli import main
from ot_cfm.images import CLASSIFIER_CACHE_ENV

TINY = ["train", "--dataset", "digits", "--model", "mlp", "--width", "32", "--depth", "2", "--steps", "20",
        "--batch-size", "64", "--classifier-steps", "20", "--workers", "0"]


@pytest.fixture
def classifier_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CLASSIFIER_CACHE_ENV, str(tmp_path / "classifiers"))
    return tmp_path / "classifiers"


def test_every_phase_of_an_image_run_reports_progress(tmp_path, classifier_cache, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed, bars = captured.out, captured.err
    assert "reading digits" in printed and "read 1438 training and 359 held-out images" in printed
    assert f"training it once; it will be cached at {classifier_cache}" in printed
    # 20 steps x 64 images are too short for a quarter: the smallest evaluation, and the run says so
    assert "evaluation: 100 samples at euler-1, euler-8" in printed and "too short" in printed
    for phase in ("feature classifier", "train (", "evaluate euler-1 (100 images)", "evaluate euler-8 (100 images)",
                  "sample grid"):
        assert phase in bars, phase
    assert "20/20" in bars and "800/800" in bars and "512/512" in bars  # classifier steps; 100 x 8; 64 x 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_samples"] == 100 and metrics["eval_solvers"] == ["euler-1", "euler-8"]
    assert "frechet_distance/euler-8" in metrics and "frechet_distance/euler-2" not in metrics

    assert main([*TINY, "--out", str(tmp_path / "again")]) == 0
    assert "feature classifier: loading" in capsys.readouterr().out  # cached by the first run


def test_no_eval_skips_the_classifier_and_the_metrics(tmp_path, classifier_cache, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--no-eval", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "feature classifier" not in printed and "| solver |" not in printed
    assert not classifier_cache.exists() and (out / "samples.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_samples"] == 0 and metrics["classifier_held_out_accuracy"] is None


def test_eval_options_belong_to_image_runs(tmp_path, capsys):
    assert main(["train", "--steps", "5", "--no-eval", "--out", str(tmp_path / "toy")]) == 2
    assert "--no-eval apply to image runs only" in capsys.readouterr().err


def test_sample_writes_beside_its_run_and_refuses_to_replace_samples(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--steps", "10", "--batch-size", "32", "--eval-samples", "50", "--out", str(run),
                 "--no-progress"]) == 0
    sample = ["sample", str(run / "checkpoint.pt"), "--n", "20", "--solver", "euler", "--steps", "2"]
    assert main(sample) == 0
    first = (run / "samples" / "samples.pt").read_bytes()
    assert (run / "samples" / "samples.png").exists()
    capsys.readouterr()
    assert main([*sample, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "samples.pt and" in err and "already exist" in err and "--overwrite" in err
    assert (run / "samples" / "samples.pt").read_bytes() == first  # untouched
    assert main([*sample, "--seed", "1", "--overwrite"]) == 0
    assert (run / "samples" / "samples.pt").read_bytes() != first


def test_a_run_without_the_ema_warmup_resumes_only_without_it(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--steps", "4", "--batch-size", "32", "--eval-samples", "50", "--ema-decay", "0.9",
            "--schedule", "constant", "--out", str(out), "--no-progress"]
    assert main([*args, "--no-ema-warmup"]) == 0
    capsys.readouterr()
    assert main([*args[:-1], "--steps", "6", "--resume", "--no-progress"]) == 2
    assert "config.ema_warmup: checkpoint False vs now True" in capsys.readouterr().err
    assert main([*args[:-1], "--steps", "6", "--resume", "--no-progress", "--no-ema-warmup"]) == 0
