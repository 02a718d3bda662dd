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
