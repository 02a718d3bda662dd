"""The evaluation after an image run: its plan keeps a bounded share of training's cost, and each phase reports
progress with a total to estimate the time left."""

import math

import pytest
import torch

from ot_cfm.images import ImageClassifier, load_image_dataset
from ot_cfm.images.sampling import (
    EVAL_SHARE,
    IMAGE_SETTINGS,
    evaluate_image_model,
    parse_settings,
    plan_evaluation,
    write_sample_grid,
)
from ot_cfm.models import MLP


def _training_forwards(steps, batch_size):
    return 3 * steps * batch_size


def test_plan_of_a_200_step_digits_run_keeps_every_setting():
    plan = plan_evaluation(200, 256)
    # 0.25 x 3 x 200 x 256 = 38400 image-NFE over Euler 1 + 2 + 4 + 8 and dopri5 planned at 50: 65 per image
    assert plan.settings == IMAGE_SETTINGS and plan.n == math.floor(38400 / 65) == 590
    assert plan.share == pytest.approx(590 * 65 / 153600)


@pytest.mark.parametrize("steps, batch_size", [(100, 64), (200, 256), (1000, 128), (5000, 256), (300, 32), (50, 128)])
def test_default_plan_stays_within_its_share_whenever_the_run_allows(steps, batch_size):
    plan = plan_evaluation(steps, batch_size)
    cost = plan.share * _training_forwards(steps, batch_size)
    assert plan.share <= EVAL_SHARE + 1e-12 and 500 <= plan.n <= 2000
    assert cost == pytest.approx(plan.n * sum({"dopri5": 50}.get(s, 0) or int(s.split("-")[1]) for s in plan.settings))


def test_a_run_too_short_for_the_share_gets_the_smallest_evaluation_and_says_so():
    plan = plan_evaluation(4, 16)
    assert (plan.n, plan.settings) == (100, ("euler-1", "euler-8")) and plan.share > EVAL_SHARE
    assert "too short" in plan.reason and "100 samples" in plan.describe()


def test_given_samples_or_settings_are_kept():
    # 2000 samples: all settings (2000 x 65) are over the 38400 budget, Euler 1, 2, 4, 8 (2000 x 15) are not
    assert plan_evaluation(200, 256, samples=2000) == plan_evaluation(200, 256, samples=2000)
    plan = plan_evaluation(200, 256, samples=2000)
    assert plan.n == 2000 and plan.settings == ("euler-1", "euler-2", "euler-4", "euler-8")
    plan = plan_evaluation(200, 256, settings="euler-4, dopri5")  # 4 + 50 per image
    assert plan.settings == ("euler-4", "dopri5") and plan.n == math.floor(38400 / 54) == 711


@pytest.mark.parametrize("text", ["euler", "euler-0", "rk45", "euler-1,euler-1", "", "dopri5,"])
def test_bad_settings_are_refused_naming_them(text):
    with pytest.raises(ValueError, match="solver settings must be"):
        parse_settings(text)


@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits")


def test_every_evaluation_phase_shows_progress_with_a_total(digits, capsys):
    torch.manual_seed(0)
    model = MLP(64, width=32, depth=2)
    classifier = ImageClassifier(digits.shape, digits.num_classes)
    _, rows = evaluate_image_model(model, digits, classifier, n=40, conditional=False, guidance=1.0, seed=0,
                                   settings=("euler-2", "dopri5"))
    err = capsys.readouterr().err
    assert [r["solver"] for r in rows] == ["euler-2", "dopri5"]
    assert "evaluate euler-2 (40 images)" in err and "80/80" in err  # 40 images x 2 evaluations: exact total
    assert "evaluate dopri5 (40 images)" in err and "/8000" in err  # adaptive: bounded by the cap, 40 x 200


def test_the_sample_grid_shows_progress(tmp_path, capsys):
    torch.manual_seed(0)
    write_sample_grid(tmp_path / "g.png", MLP(64, width=16, depth=1), (1, 8, 8), None, None, 1.0, 0, "grid")
    err = capsys.readouterr().err
    assert "sample grid" in err and "512/512" in err  # 64 images x 8 Euler steps
