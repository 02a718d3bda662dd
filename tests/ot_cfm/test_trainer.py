import json
import math
import multiprocessing
import os
import signal

import pytest
import torch

from ot_cfm.couplers.sinkhorn import SinkhornCoupler
from ot_cfm.data import toy_sampler
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import CHECKPOINT_NAME, METRICS_NAME, TrainConfig, Trainer


def make_trainer(folder, target=None, **overrides):
    torch.manual_seed(0)  # model initialisation only
    config = dict(out_dir=str(folder), steps=12, batch_size=32, lr=1e-2, warmup_steps=3, schedule="cosine", grad_clip=1.0,
                  ema_decay=0.9, log_every=2, checkpoint_every=5, progress=False)
    config.update(overrides)
    return Trainer(MLP(2, width=16, depth=2), ConditionalFlowMatcher(sigma=0.1), toy_sampler("gaussian"),
                   target or toy_sampler("moons"), TrainConfig(**config))


def weights(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()]
                     + [p.detach().flatten() for p in trainer.ema.module.parameters()])


def failing_after(calls, action):
    sampler, count = toy_sampler("moons"), [0]

    def draw(n, generator=None):
        count[0] += 1
        if count[0] == calls:
            action()
        return sampler(n, generator)
    return draw


def test_resume_after_sigint_equals_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full")
    full.fit()
    interrupted = make_trainer(tmp_path / "cut", target=failing_after(7, lambda: os.kill(os.getpid(), signal.SIGINT)))
    with pytest.raises(KeyboardInterrupt, match="step 7"):
        interrupted.fit()
    resumed = make_trainer(tmp_path / "cut")
    resumed.fit(resume=True)
    assert resumed.step == 12
    torch.testing.assert_close(weights(resumed), weights(full), rtol=0, atol=0)
    # the log holds each step once, as if nothing had happened
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / METRICS_NAME).read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]


def test_resume_after_crash_restarts_from_last_periodic_checkpoint(tmp_path):
    full = make_trainer(tmp_path / "full")
    full.fit()

    def crash():
        raise RuntimeError("simulated crash")
    crashed = make_trainer(tmp_path / "cut", target=failing_after(9, crash))
    with pytest.raises(RuntimeError, match="simulated"):
        crashed.fit()
    assert torch.load(tmp_path / "cut" / CHECKPOINT_NAME, weights_only=False)["step"] == 5
    resumed = make_trainer(tmp_path / "cut")
    resumed.fit(resume=True)
    torch.testing.assert_close(weights(resumed), weights(full), rtol=0, atol=0)
    assert not [p for p in os.listdir(tmp_path / "cut") if p.endswith(".tmp")]


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    make_trainer(tmp_path, steps=5).fit()
    with pytest.raises(ValueError, match="another configuration.*config.lr"):
        make_trainer(tmp_path, lr=5e-3).fit(resume=True)
    other_model = Trainer(MLP(2, width=8, depth=2), ConditionalFlowMatcher(sigma=0.1), toy_sampler("gaussian"),
                          toy_sampler("moons"), make_trainer(tmp_path).config)
    with pytest.raises(ValueError, match="parameter_shapes"):
        other_model.fit(resume=True)


def test_checkpoint_with_another_data_stream_is_refused(tmp_path):
    make_trainer(tmp_path, steps=5).fit()
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    del state["fingerprint"]["data_stream"]  # as written before batches were drawn per step
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="another configuration.*data_stream"):
        make_trainer(tmp_path).fit(resume=True)


def test_checkpoint_from_another_matcher_model_or_metadata_is_refused(tmp_path):
    """Settings outside TrainConfig that change the weights: sigma, the coupler's settings, the activation
    (same parameter shapes), and the metadata naming the data."""
    make_trainer(tmp_path, steps=5).fit()
    config = make_trainer(tmp_path, steps=5).config
    torch.manual_seed(0)
    others = {
        "matcher": Trainer(MLP(2, width=16, depth=2), ConditionalFlowMatcher(sigma=0.2), toy_sampler("gaussian"),
                           toy_sampler("moons"), config),
        "Sinkhorn": Trainer(MLP(2, width=16, depth=2), ConditionalFlowMatcher(SinkhornCoupler(epsilon=0.1), sigma=0.1),
                            toy_sampler("gaussian"), toy_sampler("moons"), config),
        "model": Trainer(MLP(2, width=16, depth=2, activation="relu"), ConditionalFlowMatcher(sigma=0.1),
                         toy_sampler("gaussian"), toy_sampler("moons"), config),
        "metadata": Trainer(MLP(2, width=16, depth=2), ConditionalFlowMatcher(sigma=0.1), toy_sampler("gaussian"),
                            toy_sampler("moons"), config, metadata={"target": "circles"}),
    }
    for name, trainer in others.items():
        with pytest.raises(ValueError, match=f"another configuration.*{name}"):
            trainer.fit(resume=True)
    make_trainer(tmp_path, steps=5).fit(resume=True)  # the same settings resume


def test_cosine_schedule_cannot_be_extended_on_resume(tmp_path):
    """The cosine schedule's length sets every step's lr: a longer run is another configuration."""
    make_trainer(tmp_path, steps=6).fit()
    with pytest.raises(ValueError, match="another configuration.*config.steps.*only constant-schedule runs"):
        make_trainer(tmp_path, steps=10).fit(resume=True)


@pytest.mark.parametrize("field", ["log_every", "checkpoint_every"])
def test_zero_logging_or_checkpoint_interval_is_refused(field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: 0})


def test_longer_run_may_resume_a_shorter_one(tmp_path):
    make_trainer(tmp_path, steps=6, schedule="constant").fit()
    longer = make_trainer(tmp_path, steps=10, schedule="constant")
    assert longer.fit(resume=True).step == 10


def test_evaluation_runs_on_ema_weights_and_is_logged(tmp_path):
    seen = []

    def evaluate(model, step):
        seen.append((model, step))
        return {"score": float(step)}
    trainer = make_trainer(tmp_path, eval_every=4)
    trainer.evaluate = evaluate
    result = trainer.fit()
    assert [s for _, s in seen] == [4, 8, 12] and all(m is trainer.ema.module for m, _ in seen)
    assert [r["score"] for r in result.history if "score" in r] == [4.0, 8.0, 12.0]


@pytest.mark.parametrize("bad", [dict(steps=0), dict(schedule="linear"), dict(ema_decay=1.0), dict(lr=-1.0),
                                 dict(workers=-1), dict(workers="many"), dict(threads=0), dict(threads="auto")])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_resume_without_out_dir_raises():
    with pytest.raises(ValueError, match="out_dir"):
        make_trainer(None, out_dir=None).fit(resume=True)


def exact_trainer(folder, **overrides):
    from ot_cfm.couplers.exact import ExactOTCoupler
    trainer = make_trainer(folder, **overrides)
    trainer.matcher = ConditionalFlowMatcher(ExactOTCoupler(), sigma=0.1)
    return trainer


def test_worker_processes_train_the_same_weights(tmp_path):
    in_process = exact_trainer(tmp_path / "a", workers=0)
    in_process.fit()
    with_workers = exact_trainer(tmp_path / "b", workers=2)
    with_workers.fit()
    torch.testing.assert_close(weights(with_workers), weights(in_process), rtol=0, atol=0)


def test_sigint_with_workers_checkpoints_and_resumes_exactly(tmp_path):
    full = exact_trainer(tmp_path / "full")
    full.fit()

    def interrupt_at_4(model, step):  # runs in the training process while the workers prefetch
        if step == 4:  # Ctrl-C in a terminal signals the whole process group: the workers too
            workers = multiprocessing.active_children()
            assert len(workers) == 2
            for pid in [w.pid for w in workers] + [os.getpid()]:
                os.kill(pid, signal.SIGINT)
        return {}
    cut = exact_trainer(tmp_path / "cut", workers=2, eval_every=4)
    assert full.config.workers == "auto"  # the default; the weights do not depend on the choice
    cut.evaluate = interrupt_at_4
    with pytest.raises(KeyboardInterrupt, match="step 4"):
        cut.fit()
    resumed = exact_trainer(tmp_path / "cut", workers=1)
    resumed.fit(resume=True)
    torch.testing.assert_close(weights(resumed), weights(full), rtol=0, atol=0)


def test_learning_rate_follows_warmup_then_cosine():
    """lr of step k: lr (k + 1) / W during the warm-up (k < W), then lr (1 + cos(pi (k - W) / (S - W))) / 2,
    written here from the formula (a constant or an off-by-one schedule fails)."""
    trainer = make_trainer(None, steps=12, warmup_steps=3, lr=0.01, out_dir=None)
    used = []
    for _ in range(12):
        used.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.train_step()
    expected = [0.01 * (k + 1) / 3 if k < 3 else 0.01 * 0.5 * (1 + math.cos(math.pi * (k - 3) / 9)) for k in range(12)]
    assert used == pytest.approx(expected, rel=1e-12, abs=1e-15)
    constant = make_trainer(None, steps=12, warmup_steps=2, lr=0.01, out_dir=None, schedule="constant")
    used = []
    for _ in range(4):
        used.append(constant.optimizer.param_groups[0]["lr"])
        constant.train_step()
    assert used == pytest.approx([0.005, 0.01, 0.01, 0.01], rel=1e-12)


def test_resuming_a_finished_run_trains_nothing_and_says_so(tmp_path):
    trained = make_trainer(tmp_path)
    first = trained.fit()
    again = make_trainer(tmp_path)
    result = again.fit(resume=True)
    assert result.step == 12 and result.start_step == 12 and result.steps_trained == 0 and result.history == []
    assert result.loss == first.loss and math.isfinite(result.loss)  # the run's last loss, from the checkpoint
    torch.testing.assert_close(weights(again), weights(trained), rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]  # the log is kept, not truncated or extended


def test_log_row_cut_short_by_a_killed_run_is_dropped_on_resume(tmp_path):
    make_trainer(tmp_path, steps=6, schedule="constant").fit()
    with open(tmp_path / METRICS_NAME, "a") as f:
        f.write('{"step": 7, "lo')  # the append a kill interrupted
    result = make_trainer(tmp_path, steps=8, schedule="constant").fit(resume=True)
    assert result.steps_trained == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def test_metrics_log_is_strict_json(tmp_path):
    trainer = make_trainer(tmp_path, steps=4, eval_every=2)
    trainer.evaluate = lambda model, step: {"w2": float("nan") if step == 2 else 0.5}
    trainer.fit()
    rows = [json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in the log"))
            for line in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert [r.get("w2", "absent") for r in rows] == [None, 0.5]


def test_threads_are_set_during_fit_restored_after_and_reported(tmp_path):
    seen = []

    def evaluate(model, step):
        seen.append(torch.get_num_threads())
        return {}
    before = torch.get_num_threads()
    trainer = make_trainer(tmp_path, steps=4, eval_every=2, threads=before + 1)
    trainer.evaluate = evaluate
    result = trainer.fit()
    assert seen == [before + 1, before + 1] and result.threads == before + 1
    assert torch.get_num_threads() == before
    # automatic: one thread for this small model, whatever torch was set to
    torch.set_num_threads(2)
    try:
        trainer = make_trainer(tmp_path / "auto", steps=4, eval_every=2)
        trainer.evaluate = evaluate
        assert trainer.fit().threads == 1 and seen[-1] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_automatic_workers_follow_the_coupler(tmp_path):
    from ot_cfm.utils.parallelism import available_cores
    assert make_trainer(tmp_path / "independent", steps=2).fit().workers == 0
    exact = exact_trainer(tmp_path / "exact", steps=2).fit()
    assert exact.workers == (min(max(2, available_cores() - 1), available_cores(), 8) if available_cores() >= 2 else 0)


def test_fresh_start_into_a_folder_holding_another_run_is_refused(tmp_path):
    first = make_trainer(tmp_path / "run")
    first.fit()
    checkpoint = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="holds another run.*resume=True.*overwrite=True"):
        make_trainer(tmp_path / "run").fit()
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == checkpoint
    first.fit()  # the same trainer again: its own checkpoint, nothing to refuse
    again = make_trainer(tmp_path / "run")
    again.fit(overwrite=True)
    assert torch.equal(weights(again), weights(first))  # started over: the same run from scratch
