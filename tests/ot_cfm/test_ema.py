"""The EMA of the weights: the warm-up's closed form over the first steps, and what it does to a short run."""

import pytest
import torch

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.data import toy_sampler
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import TrainConfig, Trainer
from ot_cfm.training.ema import ema_decay_at


def _trainer(tmp_path=None, **config):
    torch.manual_seed(0)
    settings = dict(steps=8, batch_size=32, lr=1e-2, workers=0, progress=False, ema_decay=0.5)
    settings.update(config)
    return Trainer(MLP(2, width=16, depth=2), ConditionalFlowMatcher(coupler=ExactOTCoupler()), toy_sampler("gaussian"),
                   toy_sampler("moons"), TrainConfig(out_dir=str(tmp_path) if tmp_path else None, **settings))


def test_decay_schedule_values():
    assert [ema_decay_at(k, 0.999, True) for k in (1, 2, 199)] == [2 / 11, 3 / 12, 200 / 209]
    assert ema_decay_at(10**6, 0.999, True) == 0.999 and ema_decay_at(1, 0.999, False) == 0.999


@pytest.mark.parametrize("warmup", [True, False])
def test_average_follows_the_closed_form_over_the_first_steps(warmup):
    trainer = _trainer(ema_warmup=warmup)
    expected = None
    for step in range(1, 7):
        trainer.train_step()
        weights = [p.detach().clone().double() for p in trainer.model.parameters()]
        if expected is None:
            expected = weights  # the first step's weights are copied
        else:
            d = min(0.5, step / (9 + step)) if warmup else 0.5  # k = step - 1 updates so far
            expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
        for e, a in zip(expected, trainer.ema.module.parameters()):
            torch.testing.assert_close(a.double(), e, rtol=1e-6, atol=1e-7)


def test_warmup_keeps_a_short_run_average_near_the_model():
    """After 8 steps at decay 0.999 the plain average is still the first step's weights (0.999^7 = 99 % of them);
    the warmed-up one follows the model."""
    plain, warm = _trainer(ema_decay=0.999, ema_warmup=False), _trainer(ema_decay=0.999)
    plain.train_step()
    first = [p.detach().clone() for p in plain.model.parameters()]
    warm.train_step()
    for trainer in (plain, warm):
        for _ in range(7):
            trainer.train_step()

    def distance(a, b):
        return sum(float((x.detach() - y.detach()).pow(2).sum()) for x, y in zip(a, b)) ** 0.5

    moved = distance(plain.model.parameters(), first)  # the same training in both: the EMA does not change it
    assert distance(plain.ema.module.parameters(), first) < 0.02 * moved
    assert distance(warm.ema.module.parameters(), warm.model.parameters()) < 0.5 * moved


def test_resume_continues_the_warmup_exactly(tmp_path):
    whole = _trainer(tmp_path / "whole")
    whole.fit()
    first = _trainer(tmp_path / "cut", steps=3)
    first.fit()
    resumed = _trainer(tmp_path / "cut")
    resumed.fit(resume=True)
    for a, b in zip(whole.ema.module.parameters(), resumed.ema.module.parameters()):
        assert torch.equal(a, b)


def test_a_checkpoint_without_warmup_resumes_only_without_it(tmp_path):
    _trainer(tmp_path, steps=3, ema_warmup=False).fit()
    with pytest.raises(ValueError, match="config.ema_warmup: checkpoint False vs now True"):
        _trainer(tmp_path).fit(resume=True)
    assert _trainer(tmp_path, ema_warmup=False).fit(resume=True).step == 8
