"""The coupler contract: re-pair a source batch with a target batch.

A coupler sees x0 of shape (B0, *shape) and x1 of shape (B1, *shape) and returns index
tensors (i, j) of equal length: the k-th training pair is (x0[i[k]], x1[j[k]]). Labels
follow their points. Concrete couplers only implement ``indices`` and ``plan``.

``centre_and_scale`` is the conditioning step every cost-based coupler runs first: the squared
Euclidean cost |x0_i - x1_j|^2 does not change when both batches move by one common point, the exact
OT plan not even when each batch moves by its own, and every coupling that depends on the cost only
through its order (exact OT) or through cost / epsilon with a relative epsilon (Sinkhorn) does not
change when both are divided by one common positive number.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ot_cfm.validation import check_pair

__all__ = ["Coupler", "sample_rows", "centre_and_scale"]


def sample_rows(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One column index per row of ``logits`` (n, m), drawn with probability softmax(logits[i]).

    Gumbel-max: ``argmax_j logits[i, j] + G[i, j]`` with G standard Gumbel; entries at -inf are never
    drawn. Uniforms come from ``generator`` on its own device, so a CPU generator serves any device.
    """
    device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, device=device, dtype=torch.float64).to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    return torch.argmax(logits.to(torch.float64) + gumbel, dim=1)


def _max_abs(x: torch.Tensor) -> float:
    """max |x| over all entries (0 for an empty tensor), NaN or inf if x holds one; one global min-max."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x)
    return max(-float(lo), float(hi))


def _power_of_two_above(m: float) -> float:
    """The power of two 2^e with m < 2^e <= 2 m (1 for m = 0), capped at 2^1023, float64's largest."""
    return math.ldexp(1.0, min(math.frexp(m)[1], 1023)) if m > 0 else 1.0


def _centre_copies(a: torch.Tensor, b: torch.Tensor, separately: bool, dtype: torch.dtype,
                   pre: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Copies of a / pre and b / pre in ``dtype``, centred in place, and their largest |entry|."""
    a, b = a.to(dtype, copy=True), b.to(dtype, copy=True)
    if pre != 1.0:
        a.mul_(1.0 / pre)
        b.mul_(1.0 / pre)
    if separately:
        for x in (a, b):
            mean = x.mean(0)
            if _max_abs(mean) > _max_abs(x) / 2:  # an offset beyond the spread: it would cost digits
                x.sub_(mean)
    else:
        centre = (a.sum(0) + b.sum(0)) / (a.shape[0] + b.shape[0])
        a.sub_(centre)
        b.sub_(centre)
    return a, b, max(_max_abs(a), _max_abs(b))


def centre_and_scale(a: torch.Tensor, b: torch.Tensor, *, separately: bool = False,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(a', b', scale): a (n0, d) and b (n1, d) moved by centres c_a, c_b and divided by one power of
    two, ``scale``, so that every entry of a' = (a - c_a) / scale and b' = (b - c_b) / scale lies in
    [-1, 1], at least one beyond 1/2. New tensors in ``dtype`` (a's by default) on a's device; the
    inputs are not modified.

    By default c_a = c_b = the mean of the union: one common point, which leaves every |a_i - b_j|
    unchanged. With ``separately``, each batch whose mean exceeds half its largest |entry| is centred
    on its own mean, and the other is left in place (c = 0: its offset costs at most 2 bits of the
    cost's precision, while moving a source batch reorders scipy's augmenting paths, measured 10 %
    slower or faster from one batch to the next): |a_i - b_j|^2 then changes by a term of i, a term of
    j and a constant (and -<a_i, b_j> by a term of each), so an optimal transport plan for given
    marginals stays optimal, while the distance between the batches' means leaves the cost. Dividing
    by a power of two is exact.

    Pairwise differences are kept to the precision of the points: unlike the raw coordinates, whose
    squares overflow near 1e154 (float64) or 1e19 (float32), fall below absolute solver tolerances
    near 1e-6, and cancel in |a|^2 + |b|^2 - 2 <a, b> under an offset (at 1e6 the float64 cost keeps
    about 4 digits of unit-scale differences). Besides the copy into ``dtype``, three to five passes
    (mean, global min-max, scaling; a subtraction and a second min-max where a batch moves). Where a
    sum overflows (entries near the dtype's largest value) the points are first divided by a power of
    two, at the cost of a second round.
    """
    dtype = dtype or a.dtype
    a_c, b_c, m = _centre_copies(a, b, separately, dtype, 1.0)
    scale = 1.0
    if not math.isfinite(m):  # finite inputs, so a sum or a difference overflowed
        scale = _power_of_two_above(max(_max_abs(a), _max_abs(b)))
        a_c, b_c, m = _centre_copies(a, b, separately, dtype, scale)
    inner = _power_of_two_above(m)
    return a_c.mul_(1.0 / inner), b_c.mul_(1.0 / inner), scale * inner


class Coupler(ABC):
    """Base class of every coupler: ``indices`` and ``plan`` define it, ``pair`` applies it."""

    #: whether x0 and x1 must have the same batch size
    requires_equal_sizes: bool = False

    @abstractmethod
    def indices(self, x0: torch.Tensor, x1: torch.Tensor, *,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Index tensors (i, j), each of shape (K,) and on x0's device: pair k is (x0[i[k]], x1[j[k]])."""

    @abstractmethod
    def plan(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """The coupling as a (B0, B1) tensor of masses summing to 1, on x0's device."""

    def validate(self, x0: torch.Tensor, x1: torch.Tensor) -> None:
        """Raise ValueError on bad batches (NaN, empty, mismatched shapes, devices, dtypes)."""
        check_pair(x0, x1, same_batch_size=self.requires_equal_sizes)

    def pair(self, x0: torch.Tensor, x1: torch.Tensor, y0: torch.Tensor | None = None,
             y1: torch.Tensor | None = None, *, generator: torch.Generator | None = None):
        """Re-paired batches ``(x0[i], x1[j])``, or ``(x0[i], x1[j], y0[i], y1[j])`` when labels are given.

        Labels may be given for one side only; the other is returned as None.
        """
        i, j = self.indices(x0, x1, generator=generator)
        if y0 is None and y1 is None:
            return x0[i], x1[j]
        for name, y, x in (("y0", y0, x0), ("y1", y1, x1)):
            if y is not None and (not isinstance(y, torch.Tensor) or y.shape[0] != x.shape[0]):
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"{name} must be a tensor with one label per sample ({x.shape[0]}), got {got}")
        return x0[i], x1[j], (y0[i.to(y0.device)] if y0 is not None else None), \
            (y1[j.to(y1.device)] if y1 is not None else None)


def buffer_view(buffer: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The first rows * cols entries of a flat work buffer as a contiguous (rows, cols) matrix.

    The couplers reuse such buffers for their B x B blocks: on 2-core CPUs a fresh 16 to 32 MiB
    tensor costs more in page faults than the arithmetic on it (29 ms against 6 ms for a GEMM
    output at B = 2048)."""
    return buffer[: shape[0] * shape[1]].view(shape)
