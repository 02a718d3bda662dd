import os
import signal

import pytest
import torch
from torch.utils.data import get_worker_info

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.data import toy_sampler
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.training.batches import CoupledBatches, batch_generator, coupled_batch_stream
from ot_cfm.utils.parallelism import available_cores


def exact_batches(seed=0, size=64):
    return CoupledBatches(toy_sampler("gaussian"), toy_sampler("moons"), ConditionalFlowMatcher(ExactOTCoupler()).couple,
                          size, seed)


def test_batch_generators_differ_across_steps_and_seeds_and_repeat_on_request():
    draws = {(s, k): torch.rand(4, generator=batch_generator(s, k)) for s in range(3) for k in range(50)}
    firsts = {tuple(v.tolist()) for v in draws.values()}
    assert len(firsts) == len(draws)
    torch.testing.assert_close(torch.rand(4, generator=batch_generator(2, 17)), draws[(2, 17)], rtol=0, atol=0)


def test_a_batch_depends_on_its_step_only_and_is_coupled():
    batches = exact_batches()
    late_first = batches[5]
    _ = batches[3]
    for a, b in zip(batches[5], late_first):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x0, x1 = late_first
    g = batch_generator(0, 5)
    raw0, raw1 = toy_sampler("gaussian")(64, g), toy_sampler("moons")(64, g)
    assert torch.equal(x0, raw0)  # the exact coupler permutes the targets only
    assert torch.equal(torch.sort(x1, 0).values, torch.sort(raw1, 0).values) and not torch.equal(x1, raw1)
    coupled_cost = ((x0 - x1) ** 2).sum()
    assert coupled_cost < ((raw0 - raw1) ** 2).sum()


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_yield_the_in_process_batches_in_order(workers):
    batches = exact_batches(seed=3)
    expected = list(coupled_batch_stream(batches, range(4, 11)))
    got = list(coupled_batch_stream(batches, range(4, 11), workers=workers))
    assert len(got) == len(expected) == 7
    for (a0, a1), (b0, b1) in zip(got, expected):
        assert torch.equal(a0, b0) and torch.equal(a1, b1)


def test_any_dtype_and_layout_crosses_from_workers_unchanged():
    def bf16_images(n, generator=None):
        return torch.randn(n, 3, 2, generator=generator).to(torch.bfloat16)

    def transposed_float64(n, generator=None):  # non-contiguous
        return torch.randn(2, 3, n, generator=generator, dtype=torch.float64).permute(2, 1, 0)
    batches = CoupledBatches(bf16_images, transposed_float64, None, 5, 0)
    for (a0, a1), (b0, b1) in zip(coupled_batch_stream(batches, range(3), workers=1), coupled_batch_stream(batches, range(3))):
        assert a0.dtype == torch.bfloat16 and a1.dtype == torch.float64 and a1.shape == (5, 3, 2)
        assert torch.equal(a0, b0) and torch.equal(a1, b1)


def test_workers_get_their_cores_while_the_stream_runs():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        stream = coupled_batch_stream(exact_batches(), range(4), workers=1)
        next(stream)
        assert torch.get_num_threads() == max(1, min(4, available_cores() - 1))
        stream.close()
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_stream_leaves_threads_alone_when_its_caller_sets_them():
    before = torch.get_num_threads()
    torch.set_num_threads(available_cores() + 3)  # more than the workers leave
    try:
        stream = coupled_batch_stream(exact_batches(), range(4), workers=1, limit_threads=False)
        next(stream)
        assert torch.get_num_threads() == available_cores() + 3
        stream.close()
    finally:
        torch.set_num_threads(before)


def test_worker_errors_reach_the_training_process():
    def nan_target(n, generator=None):
        return torch.full((n, 2), float("nan"))
    batches = CoupledBatches(toy_sampler("gaussian"), nan_target, ConditionalFlowMatcher(ExactOTCoupler()).couple, 8, 0)
    with pytest.raises(ValueError, match="NaN"):
        list(coupled_batch_stream(batches, range(3), workers=1))


def test_workers_survive_ctrl_c_until_the_training_process_stops_them():
    moons = toy_sampler("moons")

    def target_hit_by_sigint(n, generator=None):  # Ctrl-C in a terminal reaches the workers too
        if get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGINT)
        return moons(n, generator)
    batches = CoupledBatches(toy_sampler("gaussian"), target_hit_by_sigint, None, 8, 0)
    assert len(list(coupled_batch_stream(batches, range(5), workers=1))) == 5


def test_bad_worker_settings_raise():
    with pytest.raises(ValueError, match="workers"):
        coupled_batch_stream(exact_batches(), range(3), workers=-1)
    on_meta = CoupledBatches(toy_sampler("gaussian"), toy_sampler("moons"), None, 8, 0, device="meta")
    with pytest.raises(ValueError, match="CPU"):
        coupled_batch_stream(on_meta, range(3), workers=1)


def test_samplers_and_batches_pickle_for_spawned_workers():
    import pickle

    from ot_cfm.data import TensorSampler, gaussian_sampler
    for sampler in [toy_sampler("swissroll"), gaussian_sampler((3, 4)), TensorSampler(torch.randn(10, 5))]:
        copy = pickle.loads(pickle.dumps(sampler))
        torch.testing.assert_close(copy(6, batch_generator(0, 1)), sampler(6, batch_generator(0, 1)), rtol=0, atol=0)
    batches = exact_batches()
    copy = pickle.loads(pickle.dumps(batches))
    for a, b in zip(copy[2], batches[2]):
        assert torch.equal(a, b)
