"""Automatic workers and threads: what they choose, and that torch's setting comes back."""

import pytest
import torch

from ot_cfm.couplers.conditional import ClassConditionalCoupler
from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.independent import IndependentCoupler
from ot_cfm.couplers.sinkhorn import SinkhornCoupler
from ot_cfm.data import toy_sampler
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training.batches import CoupledBatches
from ot_cfm.utils import parallelism
from ot_cfm.utils.parallelism import auto_threads, auto_workers, torch_threads


def batches(coupler, source=None):
    return CoupledBatches(source or toy_sampler("gaussian"), toy_sampler("moons"), ConditionalFlowMatcher(coupler).couple,
                          8, 0)


@pytest.mark.parametrize("cores, expected", [(1, 0), (2, 2), (3, 2), (4, 3), (16, 8), (64, 8)])
def test_exact_coupling_gets_workers_by_core_count(cores, expected):
    assert auto_workers(ExactOTCoupler(), batches(ExactOTCoupler()), cores=cores)[0] == expected


@pytest.mark.parametrize("coupler", [IndependentCoupler(), SinkhornCoupler(epsilon=0.1),
                                     ClassConditionalCoupler(IndependentCoupler())])
def test_couplings_that_are_not_cpu_work_get_no_workers(coupler):
    workers, reason = auto_workers(coupler, batches(coupler), cores=16)
    assert workers == 0 and type(coupler).__name__ in reason


def test_exact_coupling_within_classes_gets_workers():
    coupler = ClassConditionalCoupler(ExactOTCoupler())
    assert auto_workers(coupler, batches(coupler), cores=4)[0] == 3


def test_spawned_workers_need_samplers_they_can_import(monkeypatch):
    monkeypatch.setattr(parallelism, "_start_method", lambda: "spawn")
    assert auto_workers(ExactOTCoupler(), batches(ExactOTCoupler()), cores=4)[0] == 3
    unpicklable = batches(ExactOTCoupler(), source=lambda n, generator=None: torch.zeros(n, 2))
    workers, reason = auto_workers(ExactOTCoupler(), unpicklable, cores=4)
    assert workers == 0 and "pickle" in reason
    monkeypatch.setattr(parallelism, "_start_method", lambda: "fork")  # forked workers inherit them
    assert auto_workers(ExactOTCoupler(), unpicklable, cores=4)[0] == 3


def test_small_models_train_on_one_thread_large_ones_on_the_free_cores():
    before = torch.get_num_threads()
    torch.set_num_threads(6)
    try:
        assert auto_threads(MLP(2, width=64, depth=3), 256, workers=0, cores=16) == 1
        large = MLP(2, width=512, depth=3)  # 528k parameters x 256 points
        assert auto_threads(large, 256, workers=0, cores=16) == 6  # never above torch's setting
        assert auto_threads(large, 256, workers=2, cores=4) == 2
        assert auto_threads(large, 256, workers=4, cores=4) == 1
        assert auto_threads(MLP(2, width=64, depth=3), 2**14, workers=0, cores=16) == 6  # a large batch
    finally:
        torch.set_num_threads(before)


def test_torch_threads_restores_the_setting_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(KeyError):
        with torch_threads(before + 2):
            assert torch.get_num_threads() == before + 2
            raise KeyError("boom")
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be >= 1"):
        with torch_threads(0):
            pass

