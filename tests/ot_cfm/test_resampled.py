"""ResampledCoupler: pairs drawn with replacement from a base coupler's pairs (torchcfm's plan sampling)."""

import math
import pickle

import numpy as np
import pytest
import torch

from ot_cfm.compat.torchcfm.optimal_transport import OTPlanSampler
from ot_cfm.couplers import (
    ClassConditionalCoupler,
    ExactOTCoupler,
    IndependentCoupler,
    ResampledCoupler,
    SemidiscreteCoupler,
)
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import TrainConfig, Trainer
from proximal.discrete import DiscreteBrenierPotential


def batches(n=64, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randn(n, dim, generator=g, dtype=torch.float64) + 2


def test_pairs_lie_on_the_base_permutation_and_repeat_as_draws_with_replacement():
    x0, x1 = batches()
    n = x0.shape[0]
    _, perm = ExactOTCoupler().indices(x0, x1)
    coupler, g = ResampledCoupler(ExactOTCoupler()), torch.Generator().manual_seed(1)
    distinct, counts = [], torch.zeros(n)
    for _ in range(400):
        i, j = coupler.indices(x0, x1, generator=g)
        assert i.shape == j.shape == (n,)
        assert torch.equal(j, perm[i])  # every drawn pair is a pair of the optimal plan
        distinct.append(i.unique().numel())
        counts += torch.bincount(i, minlength=n)
    # distinct pairs among n draws with replacement: E = n (1 - (1 - 1/n)^n); a permutation would give n
    expected = n * (1 - (1 - 1 / n) ** n)
    var = n * (1 - 1 / n) ** n + n * (n - 1) * (1 - 2 / n) ** n - n ** 2 * (1 - 1 / n) ** (2 * n)
    assert abs(np.mean(distinct) - expected) < 4 * math.sqrt(var / len(distinct))
    # every pair is drawn with probability 1/n: chi-square over the n cells, 4 standard deviations
    total = counts.sum()
    chi2 = float(((counts - total / n) ** 2 / (total / n)).sum())
    assert chi2 < (n - 1) + 4 * math.sqrt(2 * (n - 1))


def test_same_law_as_torchcfms_plan_sampling_with_replacement():
    """The number of distinct pairs per batch has one law for ours and for torchcfm's sampler (compat layer)."""
    x0, x1 = batches(n=32)
    ours, g = ResampledCoupler(ExactOTCoupler()), torch.Generator().manual_seed(2)
    theirs = OTPlanSampler(method="exact", rng=np.random.default_rng(2))
    a = [ours.indices(x0, x1, generator=g)[0].unique().numel() for _ in range(300)]
    b = [np.unique(theirs.sample_map(theirs.get_map(x0, x1), 32, replace=True)[0]).size for _ in range(300)]
    se = math.sqrt(np.var(a) / len(a) + np.var(b) / len(b))
    assert abs(np.mean(a) - np.mean(b)) < 4 * se
    assert np.mean(a) < 25  # far from 32: draws with replacement, not the permutation


def test_seeded_draws_repeat_and_follow_the_generator():
    x0, x1 = batches()
    coupler = ResampledCoupler(ExactOTCoupler())
    first = coupler.indices(x0, x1, generator=torch.Generator().manual_seed(5))
    again = coupler.indices(x0, x1, generator=torch.Generator().manual_seed(5))
    other = coupler.indices(x0, x1, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_within_class_base_keeps_every_pair_inside_its_class():
    g = torch.Generator().manual_seed(0)
    y1 = torch.randint(4, (60,), generator=g)
    x0, x1 = torch.randn(60, 5, generator=g), torch.randn(60, 5, generator=g) + y1[:, None]
    coupler = ResampledCoupler(ClassConditionalCoupler())
    i, j = coupler.indices(x0, x1, generator=g, y1=y1)
    _, within = ClassConditionalCoupler().indices(x0, x1, y1=y1)
    assert torch.equal(j, within[i]) and torch.equal(y1[j], y1[i])
    a, b, la, lb = coupler.pair(x0, x1, None, y1, generator=torch.Generator().manual_seed(3))
    assert la is None and torch.equal(lb, y1[torch.cdist(b, x1).argmin(1)])
    with pytest.raises(ValueError, match="needs the data labels"):
        coupler.indices(x0, x1)


def test_labels_follow_their_points_over_a_base_without_labels():
    """OT over the points only, labels carried along: y0[i] and y1[j] of the drawn pairs (i, j)."""
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
    y0, y1 = torch.arange(40), torch.arange(40) + 100
    coupler = ResampledCoupler(ExactOTCoupler())
    assert not coupler.takes_labels
    i, j = coupler.indices(x0, x1, generator=torch.Generator().manual_seed(7))
    a, b, la, lb = coupler.pair(x0, x1, y0, y1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, x0[i]) and torch.equal(b, x1[j]) and torch.equal(la, y0[i]) and torch.equal(lb, y1[j])
    matcher = ConditionalFlowMatcher(ResampledCoupler(IndependentCoupler()))
    paired = matcher.couple(x0, x1, None, y1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(paired[3], y1[torch.cdist(paired[1], x1).argmin(1)])


class ShuffledPairs(ExactOTCoupler):
    """The optimal pairs listed in a shuffled order: i is not arange."""

    def indices(self, x0, x1, *, generator=None):
        i, j = super().indices(x0, x1)
        order = torch.randperm(i.shape[0], generator=torch.Generator().manual_seed(0))
        return i[order], j[order]


def test_draws_keep_each_base_pair_whole():
    x0, x1 = batches(n=30)
    base_i, base_j = ShuffledPairs().indices(x0, x1)
    partner = dict(zip(base_i.tolist(), base_j.tolist()))
    i, j = ResampledCoupler(ShuffledPairs()).indices(x0, x1, generator=torch.Generator().manual_seed(1))
    assert all(partner[a] == b for a, b in zip(i.tolist(), j.tolist()))
    assert i.unique().numel() < 30  # repeats: drawn with replacement


def test_plan_is_the_base_plan_and_bad_base_is_refused():
    x0, x1 = batches(n=16)
    torch.testing.assert_close(ResampledCoupler(ExactOTCoupler()).plan(x0, x1), ExactOTCoupler().plan(x0, x1))
    with pytest.raises(ValueError, match="base must be a Coupler"):
        ResampledCoupler("exact")
    support = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="not with x1"):
        ResampledCoupler(SemidiscreteCoupler(DiscreteBrenierPotential(support, None, torch.zeros(5, dtype=torch.float64))))
    coupler = pickle.loads(pickle.dumps(ResampledCoupler(IndependentCoupler())))  # travels to worker processes
    assert repr(coupler) == "ResampledCoupler(IndependentCoupler())" and not coupler.solves_on_cpu
    assert ResampledCoupler(ExactOTCoupler()).solves_on_cpu


def test_trains_with_worker_processes_as_inline():
    """A worker process draws the same resampled pairs as the inline step: equal weights after training."""
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(0)) + 3

    def fit(workers):
        torch.manual_seed(0)
        model = MLP(2, width=16, depth=2)
        config = TrainConfig(steps=6, batch_size=32, seed=3, progress=False, workers=workers, threads=1)
        Trainer(model, ConditionalFlowMatcher(ResampledCoupler(ExactOTCoupler())),
                lambda n, g: torch.randn(n, 2, generator=g), lambda n, g: data[torch.randint(256, (n,), generator=g)],
                config).fit()
        return model

    inline, workers = fit(0), fit(1)
    for p, q in zip(inline.parameters(), workers.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
