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

from ot_cfm.utils.validation import check_pair

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


#: most entries of a batch that ``centre_and_scale`` reads to choose its centre and scale: below torch's
#: parallel grain (32768), so those reads start no thread team (with two threads on a loaded two-core
#: machine every extra parallel pass over a 1024 x 784 batch cost about 10 ms)
_SAMPLE_ENTRIES = 16384


def _max_abs(x: torch.Tensor) -> float:
    """max |x| over all entries (0 for an empty tensor)."""
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x)
    return max(-float(lo), float(hi))


def _power_of_two_above(m: float) -> float:
    """The power of two 2^e with m < 2^e <= 2 m (1 for m = 0), capped at 2^1023, float64's largest."""
    return math.ldexp(1.0, min(math.frexp(m)[1], 1023)) if m > 0 else 1.0


def _sample(x: torch.Tensor) -> torch.Tensor:
    """Every ceil(n / k)-th row of x (n, d), k = min(n, _SAMPLE_ENTRIES // d), as float64."""
    k = max(1, min(x.shape[0], _SAMPLE_ENTRIES // max(x.shape[1], 1)))
    return x[:: -(-x.shape[0] // k)].to(torch.float64)


def centre_and_scale(a: torch.Tensor, b: torch.Tensor, *, separately: bool = False, dtype: torch.dtype | None = None,
                     scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(a', b', scale): a (n0, d) and b (n1, d) moved by centres c_a, c_b and divided by one power of
    two, ``scale``: a' = (a - c_a) / scale and b' = (b - c_b) / scale, new tensors in ``dtype`` (a's by
    default) on a's device; the inputs are not modified. With ``scaled=False`` the division is left
    to the caller (a' = a - c_a, b' = b - c_b; exact whenever it is done).

    By default c_a = c_b, one common point, which leaves every |a_i - b_j| unchanged. With
    ``separately``, a batch whose mean exceeds half its largest |entry| is moved by its own mean and
    the other is left in place (c = 0: its offset costs at most 2 bits of the cost's precision, while
    moving a source batch reorders scipy's augmenting paths, 10 % slower or faster from one batch to
    the next): |a_i - b_j|^2 then changes by a term of i, a term of j and a constant (and -<a_i, b_j>
    by a term of each), so an optimal transport plan for given marginals stays optimal, while the
    distance between the batches' means leaves the cost.

    Centres and scale come from a sample of rows spread over each batch (all rows up to 16384 entries;
    every ceil(n / k)-th row of k = 16384 // d beyond): the means of the sampled rows, and the power of
    two just above their largest |entry - centre|, so the sampled entries of a' and b' lie in [-1, 1]
    and the others are of order one. Any centre and any power of two keep the plan exact; the sample
    only has to find the offset and the order of magnitude. The batches themselves are read once: one
    fused pass x / scale - c / scale in their own dtype, or the conversion into ``dtype`` followed by
    the same arithmetic in place; x / scale is exact, so each entry is rounded once, as (x - c) / scale
    would be.

    Pairwise differences are kept to the precision of the points: unlike the raw coordinates, whose
    squares overflow near 1e154 (float64) or 1e19 (float32), fall below absolute solver tolerances
    near 1e-6, and cancel in |a|^2 + |b|^2 - 2 <a, b> under an offset (at 1e6 the float64 cost keeps
    about 4 digits of unit-scale differences).
    """
    dtype = dtype or a.dtype
    sa, sb = _sample(a), _sample(b)
    pre = _power_of_two_above(max(_max_abs(sa), _max_abs(sb)))  # sampled entries in [-1, 1]: no sum overflows
    sa, sb = sa / pre, sb / pre
    if separately:
        ca, cb = sa.mean(0), sb.mean(0)
        ca, cb = (c if _max_abs(c) > _max_abs(x) / 2 else None for c, x in ((ca, sa), (cb, sb)))
    else:
        ca = cb = torch.cat([sa, sb]).mean(0)
    extent = max(_max_abs(sa if ca is None else sa - ca), _max_abs(sb if cb is None else sb - cb))
    log_pre = math.frexp(pre)[1] - 1
    exponent = min(log_pre + math.frexp(_power_of_two_above(extent))[1] - 1, 1023)  # 1 when the points coincide
    scale = math.ldexp(1.0, exponent)
    inv = math.ldexp(1.0, -exponent) if scaled else 1.0
    out = []
    for x, c in ((a, ca), (b, cb)):
        shift = None if c is None else (c * math.ldexp(1.0, log_pre - (exponent if scaled else 0))).to(dtype)
        if x.dtype == dtype:  # one pass: x / scale - c / scale; x / scale is exact, the sum rounds once
            x = x.mul(inv) if shift is None else torch.add(-shift, x, alpha=inv)
        else:  # a conversion is faster on its own than fused with the arithmetic: then in place
            x = x.to(dtype)
            if scaled:  # first: then nothing overflows below, and (x / scale - c / scale) rounds once
                x.mul_(inv)
            if shift is not None:
                x.sub_(shift)
        out.append(x)
    return out[0], out[1], scale


class Coupler(ABC):
    """Base class of every coupler: ``indices`` and ``plan`` define it, ``pair`` applies it."""

    #: whether x0 and x1 must have the same batch size
    requires_equal_sizes: bool = False
    #: whether ``indices`` and ``plan`` take the data labels ``y1`` (couple within classes)
    takes_labels: bool = False
    #: whether coupling is CPU solver work (POT, scipy) that worker processes can overlap with the model step
    solves_on_cpu: bool = False

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

        Labels may be given for one side only; the other is returned as None. A coupler whose ``indices``
        takes ``y1`` (``takes_labels``) couples with it; labels follow their points either way.
        """
        if self.takes_labels:  # couples with the data labels (``ClassConditionalCoupler``)
            i, j = self.indices(x0, x1, generator=generator, y1=y1)
        else:
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
