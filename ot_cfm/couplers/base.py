"""The coupler contract: re-pair a source batch with a target batch.

A coupler sees x0 of shape (B0, *shape) and x1 of shape (B1, *shape) and returns index
tensors (i, j) of equal length: the k-th training pair is (x0[i[k]], x1[j[k]]). Labels
follow their points. Concrete couplers only implement ``indices`` and ``plan``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ot_cfm.validation import check_pair

__all__ = ["Coupler", "sample_rows"]


def sample_rows(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One column index per row of ``logits`` (n, m), drawn with probability softmax(logits[i]).

    Gumbel-max: ``argmax_j logits[i, j] + G[i, j]`` with G standard Gumbel; entries at -inf are never
    drawn. Uniforms come from ``generator`` on its own device, so a CPU generator serves any device.
    """
    device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, device=device, dtype=torch.float64).to(logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    return torch.argmax(logits.to(torch.float64) + gumbel, dim=1)


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
