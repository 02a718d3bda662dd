"""The coupler contract: re-pair a source batch with a target batch.

A coupler sees x0 of shape (B0, *shape) and x1 of shape (B1, *shape) and returns index
tensors (i, j) of equal length: the k-th training pair is (x0[i[k]], x1[j[k]]). Labels
follow their points. Concrete couplers only implement ``indices`` and ``plan``.

``centre_and_scale`` is the conditioning step every cost-based coupler runs first: the squared
Euclidean cost |x0_i - x1_j|^2 does not change when both batches move by one common point, and every
coupling that depends on the cost only through its order (exact OT) or through cost / epsilon with a
relative epsilon (Sinkhorn) does not change when both are divided by one common positive number.
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


def centre_and_scale(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(a', b', scale): a (n0, d) and b (n1, d) moved by one common point c and divided by one power of
    two, ``scale``, so that every entry of a' = (a - c) / scale and b' = (b - c) / scale lies in [-1, 1].

    c is the midrange of the union, per coordinate (min + max) / 2, which minimises the largest entry;
    ``scale`` is the power of two just above the largest |entry - c| (1 when all points coincide), so
    the division is exact. Pairwise differences, and so |a_i - b_j|^2 / scale^2, are kept to the
    precision of a and b's dtype: unlike the raw coordinates, whose squares overflow near 1e154
    (float64) or 1e19 (float32), underflow or fall below absolute solver tolerances near 1e-6, and
    cancel in |a|^2 + |b|^2 - 2 <a, b> under a common offset (at 1e6 the float64 cost keeps about 4
    digits of unit-scale differences). Three elementwise passes over the data (min-max, subtraction,
    exact scaling), in a's dtype and on its device; the inputs are not modified.
    """
    lo_a, hi_a = torch.aminmax(a, dim=0)
    lo_b, hi_b = torch.aminmax(b, dim=0)
    lo, hi = torch.minimum(lo_a, lo_b), torch.maximum(hi_a, hi_b)
    centre = lo / 2 + hi / 2  # halves first: (lo + hi) overflows for entries near the dtype's maximum
    half_range = float((hi / 2 - lo / 2).max()) if a.shape[1] else 0.0
    # half_range < scale <= 2 half_range (capped at 2^1023, the largest power of two in float64)
    scale = math.ldexp(1.0, min(math.frexp(half_range)[1], 1023)) if half_range > 0 else 1.0
    # (x - c) rounds once; multiplying by a power of two is exact, so each entry rounds exactly once
    return (a - centre).mul_(1.0 / scale), (b - centre).mul_(1.0 / scale), scale


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
