"""Class-conditional OT-CFM: the within-class coupler, labels through the trainer, guidance."""

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from ot_cfm.couplers import ClassConditionalCoupler, ExactOTCoupler, IndependentCoupler


def labelled_batch(counts, dim=5, seed=0):
    """Noise x0 (B, dim), data x1 (B, dim) whose class c sits around 3 e_c, labels y1 shuffled."""
    g = torch.Generator().manual_seed(seed)
    y1 = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    y1 = y1[torch.randperm(y1.numel(), generator=g)]
    centres = 3.0 * torch.eye(len(counts), dim, dtype=torch.float64)
    x1 = centres[y1] + 0.5 * torch.randn(y1.numel(), dim, generator=g, dtype=torch.float64)
    x0 = torch.randn(y1.numel(), dim, generator=g, dtype=torch.float64)
    return x0, x1, y1


def scipy_class_cost(x0, x1, rows):
    cost = torch.cdist(x0[rows], x1[rows]).pow(2).numpy()
    r, c = linear_sum_assignment(cost)
    return float(cost[r, c].sum())


@pytest.mark.parametrize("counts", [(8, 8, 8, 8), (1, 17, 5, 2, 9), (30,)])
def test_within_class_pairs_share_the_class_and_are_optimal_inside_each(counts):
    x0, x1, y1 = labelled_batch(counts)
    i, j = ClassConditionalCoupler().indices(x0, x1, y1=y1)
    assert torch.equal(i, torch.arange(len(y1)))
    assert torch.equal(torch.sort(j).values, torch.arange(len(y1)))  # every data point exactly once
    assert torch.equal(y1[j], y1[i])  # noise point i is assigned the class of the label drawn beside it
    for c in range(len(counts)):
        rows = (y1 == c).nonzero().squeeze(1)
        ours = float((x0[rows] - x1[j[rows]]).pow(2).sum())
        assert ours == pytest.approx(scipy_class_cost(x0, x1, rows), rel=1e-12, abs=1e-12)


def test_naive_exact_ot_crosses_classes_and_within_class_does_not():
    x0, x1, y1 = labelled_batch((16, 16, 16, 16), seed=3)
    _, j_naive = ExactOTCoupler().indices(x0, x1)
    assert (y1[j_naive] != y1).float().mean() > 0.3  # the skew the coupler removes
    _, j = ClassConditionalCoupler().indices(x0, x1, y1=y1)
    assert torch.equal(y1[j], y1)
    # within-class costs more in total than the unconstrained optimum, never less
    assert (x0 - x1[j]).pow(2).sum() >= (x0 - x1[j_naive]).pow(2).sum()


def test_pair_carries_labels_and_plan_is_block_diagonal():
    x0, x1, y1 = labelled_batch((3, 7, 2), dim=3, seed=1)
    px0, px1, py0, py1 = ClassConditionalCoupler().pair(x0, x1, None, y1)
    assert py0 is None and torch.equal(py1, y1) and torch.equal(px0, x0)
    plan = ClassConditionalCoupler().plan(x0, x1, y1=y1)
    assert plan.sum().item() == pytest.approx(1.0)
    assert plan[y1[:, None] != y1[None, :]].abs().max() == 0
    _, j = ClassConditionalCoupler().indices(x0, x1, y1=y1)
    assert torch.equal(plan.argmax(1), j)


def test_soft_penalty_interpolates_between_naive_and_within_class():
    x0, x1, y1 = labelled_batch((16, 16, 16, 16), seed=3)
    crossing = []
    for penalty in (1e-6, 0.5, 1e3):
        _, j = ClassConditionalCoupler(penalty=penalty).indices(x0, x1, y1=y1)
        assert torch.equal(torch.sort(j).values, torch.arange(len(y1)))
        crossing.append(int((y1[j] != y1).sum()))
    _, j_naive = ExactOTCoupler().indices(x0, x1)
    assert crossing[0] == int((y1[j_naive] != y1).sum())
    assert crossing[0] > crossing[1] > crossing[2] == 0


def test_other_base_couplers_work_inside_classes():
    x0, x1, y1 = labelled_batch((4, 6), seed=2)
    i, j = ClassConditionalCoupler(IndependentCoupler()).indices(x0, x1, y1=y1)
    assert torch.equal(y1[j], y1[i])


@pytest.mark.parametrize("bad, match", [
    (dict(y1=None), "needs the data labels y1"),
    (dict(y1=torch.zeros(5)), "integer tensor of shape"),
    (dict(y1=torch.zeros(4, dtype=torch.long)), r"shape \(5,\)"),
])
def test_missing_or_bad_labels_are_refused(bad, match):
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match=match):
        ClassConditionalCoupler().indices(x, x.clone(), **bad)


def test_bad_construction_and_unequal_sizes_are_refused():
    with pytest.raises(ValueError, match="penalty must be None"):
        ClassConditionalCoupler(penalty=0.0)
    with pytest.raises(ValueError, match="base must be a Coupler"):
        ClassConditionalCoupler(ExactOTCoupler)
    with pytest.raises(ValueError):
        ClassConditionalCoupler().indices(torch.randn(4, 2), torch.randn(5, 2), y1=torch.zeros(5, dtype=torch.long))


# ---------------------------------------------------------------- labels through the matcher and the trainer

import os  # noqa: E402
import signal  # noqa: E402

from ot_cfm.data import TensorSampler, gaussian_sampler  # noqa: E402
from ot_cfm.images import load_image_dataset  # noqa: E402
from ot_cfm.matcher import ConditionalFlowMatcher  # noqa: E402
from ot_cfm.models import MLP, guided_field  # noqa: E402
from ot_cfm.solvers.ode import sample  # noqa: E402
from ot_cfm.training import TrainConfig, Trainer  # noqa: E402
from ot_cfm.training.batches import CoupledBatches, batch_generator, coupled_batch_stream  # noqa: E402

_DIGITS = {}


def digits_sampler():
    """Flattened digits (N, 64) in [-1, 1] with labels, as a labelled sampler."""
    if not _DIGITS:
        data = load_image_dataset("digits")
        _DIGITS["x"] = data.train_images.reshape(data.train_images.shape[0], -1)
        _DIGITS["y"] = data.train_labels
    return TensorSampler(_DIGITS["x"], _DIGITS["y"], labelled=True)


class CountingSampler:
    """A labelled sampler that runs ``action`` at its ``calls``-th draw."""

    labelled = True

    def __init__(self, sampler, calls, action):
        self.sampler, self.calls, self.action, self.count = sampler, calls, action, 0

    def __call__(self, n, generator=None):
        self.count += 1
        if self.count == self.calls:
            self.action()
        return self.sampler(n, generator)


def conditional_trainer(folder, target=None, model=None, **overrides):
    torch.manual_seed(0)  # model initialisation only
    config = dict(out_dir=None if folder is None else str(folder), steps=12, batch_size=40, lr=3e-3,
                  warmup_steps=2, schedule="cosine", grad_clip=1.0, ema_decay=0.9, log_every=1,
                  checkpoint_every=5, progress=False, workers=0, label_dropout=0.1)
    config.update(overrides)
    model = model or MLP(64, width=64, depth=2, num_classes=10)
    return Trainer(model, ConditionalFlowMatcher(ClassConditionalCoupler()),
                   gaussian_sampler((64,)), target or digits_sampler(), TrainConfig(**config))


def weights(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()]
                     + [p.detach().flatten() for p in trainer.ema.module.parameters()])


def test_a_few_conditional_training_steps_on_digits_give_finite_decreasing_loss():
    trainer = conditional_trainer(None, steps=150, schedule="constant", warmup_steps=0)
    result = trainer.fit()
    losses = torch.tensor([row["loss"] for row in result.history])
    assert losses.numel() == 150 and torch.isfinite(losses).all()
    first, last = losses[:20].mean(), losses[-20:].mean()
    assert last < 0.8 * first, (float(first), float(last))


def test_conditional_run_with_label_dropout_resumes_exactly(tmp_path):
    full = conditional_trainer(tmp_path / "full")
    full.fit()
    cut = conditional_trainer(tmp_path / "cut", target=CountingSampler(digits_sampler(), 7,
                                                                       lambda: os.kill(os.getpid(), signal.SIGINT)))
    with pytest.raises(KeyboardInterrupt, match="step 7"):
        cut.fit()
    resumed = conditional_trainer(tmp_path / "cut")
    resumed.fit(resume=True)
    assert resumed.step == 12
    torch.testing.assert_close(weights(resumed), weights(full), rtol=0, atol=0)
    # the dropout reaches the model: without it the weights differ
    no_dropout = conditional_trainer(None, label_dropout=0.0)
    no_dropout.fit()
    assert not torch.equal(weights(no_dropout), weights(full))


def test_checkpoint_with_another_label_dropout_is_refused(tmp_path):
    conditional_trainer(tmp_path, steps=5).fit()
    with pytest.raises(ValueError, match="label_dropout"):
        conditional_trainer(tmp_path, steps=12, label_dropout=0.0).fit(resume=True)


def test_worker_processes_train_the_same_conditional_weights(tmp_path):
    in_process = conditional_trainer(None, workers=0)
    in_process.fit()
    with_workers = conditional_trainer(None, workers=2)
    assert with_workers.fit().workers == 2
    torch.testing.assert_close(weights(with_workers), weights(in_process), rtol=0, atol=0)


def test_labelled_batches_are_coupled_within_classes_and_cross_processes():
    source, target = gaussian_sampler((64,)), digits_sampler()
    batches = CoupledBatches(source, target, ConditionalFlowMatcher(ClassConditionalCoupler()).couple,
                             batch_size=50, seed=3)
    x0, x1, y1 = batches[4]
    g = batch_generator(3, 4)
    drawn_x0, (drawn_x1, drawn_y1) = source(50, g), target(50, g)
    assert torch.equal(x0, drawn_x0) and torch.equal(y1, drawn_y1)  # noise point i keeps the class y1[i]
    rows = (x1[:, None, :] == drawn_x1[None, :, :]).all(2)  # which drawn data points each x1[k] equals
    assert (rows & (drawn_y1[None, :] == y1[:, None])).any(1).all()  # a data point of its assigned class
    for k, batch in zip(range(2, 5), coupled_batch_stream(batches, range(2, 5), workers=1)):
        assert len(batch) == 3 and all(torch.equal(a, b) for a, b in zip(batch, batches[k]))


@pytest.mark.parametrize("model, target, dropout, match", [
    (MLP(64, num_classes=10), TensorSampler(torch.randn(9, 64)), 0.0, "returns no labels"),
    (MLP(64), None, 0.0, "model .MLP. is unconditional"),
    (MLP(64), TensorSampler(torch.randn(9, 64)), 0.1, "label_dropout=0.1 needs a class-conditional model"),
])
def test_labels_and_model_must_match_at_construction(model, target, dropout, match):
    with pytest.raises(ValueError, match=match):
        conditional_trainer(None, model=model, target=target, label_dropout=dropout)


def test_a_sampler_returning_labels_for_an_unconditional_model_is_refused_at_its_first_batch():
    sampler = digits_sampler()

    def plain_function(n, generator=None):  # no `labelled` attribute: found out when it draws
        return sampler(n, generator)
    trainer = conditional_trainer(None, model=MLP(64), target=plain_function, label_dropout=0.0)
    with pytest.raises(ValueError, match="returns labels"):
        trainer.fit()
    with pytest.raises(ValueError, match="label_dropout must be a probability"):
        TrainConfig(label_dropout=1.5)


def test_matcher_loss_sends_labels_and_drops_them():
    seen = []

    class Recording(MLP):
        def forward(self, t, x, y=None):
            seen.append(y)
            return super().forward(t, x, y)
    model, matcher = Recording(3, num_classes=4), ConditionalFlowMatcher(ClassConditionalCoupler())
    x0, x1, y1 = labelled_batch((3, 2, 4, 1), dim=3)
    x0, x1 = x0.float(), x1.float()
    g = torch.Generator().manual_seed(0)
    matcher.loss(model, x0, x1, y1=y1, generator=g)
    assert torch.equal(seen[-1], y1)  # within-class coupling keeps the labels in their order
    matcher.loss(model, x0, x1, y1=y1, generator=g, label_dropout=1.0)
    assert (seen[-1] == model.null_label).all()
    with pytest.raises(ValueError, match="pass the data labels y1"):
        matcher.loss(model, x0, x1)
    with pytest.raises(ValueError, match="model is unconditional"):
        matcher.loss(MLP(3), x0, x1, y1=y1)


def test_guidance_scale_zero_is_the_unconditional_field_and_samples_run():
    trainer = conditional_trainer(None, steps=20)
    trainer.fit()
    model = trainer.sampling_model.eval()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    t = torch.full((6,), 0.3)
    with torch.no_grad():
        torch.testing.assert_close(guided_field(model, y, 0.0)(t, x), model(t, x, model.null_label), rtol=0, atol=0)
        torch.testing.assert_close(guided_field(model, y, 1.0)(t, x), model(t, x, y), rtol=0, atol=0)
        assert not torch.equal(model(t, x, y), model(t, x, model.null_label))  # the labels matter
        unconditional = sample(lambda s, z: model(s, z, model.null_label), x, solver="euler", steps=4).x
        guided = sample(guided_field(model, y, 0.0), x, solver="euler", steps=4).x
        torch.testing.assert_close(guided, unconditional, rtol=0, atol=0)
        strong = sample(guided_field(model, y, 2.0), x, solver="euler", steps=4)
        assert strong.x.shape == x.shape and torch.isfinite(strong.x).all()
