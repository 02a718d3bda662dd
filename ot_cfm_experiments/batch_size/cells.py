"""One cell of the batch-size study and the settings that decide its value.

A ``Cell`` is one measurement (target, coupler, B, seed); its key names its cache file and seeds its random
draws, so a cell's value does not depend on which other cells run or in which order. ``ExperimentConfig``
holds every setting that changes a value: it is part of each cached cell, and a change recomputes the cell.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

__all__ = ["Cell", "ExperimentConfig"]


@dataclass(frozen=True)
class Cell:
    """One measurement: coupler "exact", "sinkhorn", "population" (B = inf, batch_size 0) or "trained"."""

    target: str
    coupler: str
    batch_size: int
    seed: int

    @property
    def key(self) -> str:
        size = "inf" if self.batch_size == 0 else str(self.batch_size)
        return f"{self.target}__{self.coupler}__B{size}__seed{self.seed}"

    def generator(self) -> torch.Generator:
        """A CPU generator seeded from (target, coupler, B, seed) alone, so cells do not depend on order."""
        return torch.Generator().manual_seed(zlib.crc32(self.key.encode()))


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that decides the cells' values (part of each cached cell: a change recomputes it)."""

    n_eval: int = 4096
    max_batches: int = 256
    times: tuple[float, ...] = (0.1, 0.5, 0.9)
    epsilon: float = 1e-2
    sinkhorn_max_iters: int = 5000
    train_steps: int = 200
    train_lr: float = 1e-3
    train_width: int = 64
    train_eval_n: int = 1000
    moons_points: int = 1000
    fit_seconds: float = 90.0
