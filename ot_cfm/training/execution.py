"""How a training run executes on its machine: numeric precision, where batches are coupled, CPU worker processes
and torch threads, the prefetch thread, and the data-parallel wrapper around the model.

None of these choices changes the trained weights except ``precision``: batch k is the same whether it is coupled
in a worker, a thread or inline, on any device (``ot_cfm.training.batches``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ot_cfm.models import has_score
from ot_cfm.training.batches import CoupledBatches, overlap_mode
from ot_cfm.training.distributed import DistributedContext, per_rank_batch
from ot_cfm.utils.parallelism import auto_threads, auto_workers, available_cores

__all__ = ["PRECISIONS", "check_precision", "autocast", "coupling_device", "choose_parallelism", "prefetch_in_thread",
           "data_parallel"]

#: TrainConfig.precision -> the autocast dtype (None: no autocast)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Device types on which fp16 is refused: torch 2.13's CPU autocast does run float16 (and GradScaler("cpu")
# exists), but CPUs without native half arithmetic emulate it, slower than float32, and bf16 needs no loss
# scaling: on the CPU use "bf16".
_FP16_REFUSED_ON = frozenset({"cpu"})


def check_precision(precision: str, device: torch.device | str) -> None:
    """ValueError unless ``precision`` is one of ``PRECISIONS`` and usable on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    device_type = torch.device(device).type
    if precision == "fp16" and device_type in _FP16_REFUSED_ON:
        raise ValueError(f"precision 'fp16' needs a GPU (the model is on {device_type}); on the CPU use 'bf16' "
                         "(bfloat16 autocast, no loss scaling) or 'fp32'")



def autocast(device: torch.device, dtype: torch.dtype | None):
    """The forward's precision context: autocast to ``dtype`` on ``device``'s type, or nothing when None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def coupling_device(coupler, device: torch.device) -> torch.device:
    """Where batches are coupled: the CPU when the coupler solves there (no device round trip, and the same
    batches on every device), else the model's ``device``."""
    return torch.device("cpu") if getattr(coupler, "solves_on_cpu", False) else device


def choose_parallelism(model: nn.Module, coupler, batches: CoupledBatches, batch_size: int, workers: int | str,
                       threads: int | None, distributed: DistributedContext | None) -> tuple[int, int]:
    """(workers, threads) of this process: the configured values, or ``ot_cfm.utils.parallelism``'s automatic choice
    for "auto" and None. Data-parallel processes on one machine share its cores."""
    local = distributed.local_world_size if distributed else 1
    world_size = distributed.world_size if distributed else 1
    cores = max(1, available_cores() // local)
    if workers == "auto":
        workers = auto_workers(coupler, batches, cores=cores)[0]
    if threads is None:
        threads = auto_threads(model, per_rank_batch(batch_size, world_size), workers, cores=cores)
    return workers, threads


def prefetch_in_thread(device: torch.device, workers: int, coupled_on: torch.device,
                       distributed: DistributedContext | None, coupling_mode: str) -> bool:
    """Whether a background thread draws and couples the next batches while the model trains.

    On a CUDA model coupled on the CPU with no workers (``ot_cfm.training.batches.overlap_mode``); and for
    data-parallel global coupling without workers even on the CPU, so that each rank solves its next step's
    problem ahead instead of every rank waiting at the broadcast for one solve (2 processes on 2 cores, batch
    256: 0.70x the step time of inline coupling, median of 3 rounds)."""
    return overlap_mode(device, workers, coupled_on) == "thread" or (
        distributed is not None and coupling_mode == "global" and workers == 0)


class _FlowAndScore(nn.Module):
    """``model(*args)``, and ``model.score(*args)`` for a model with a score head, in one forward: the module
    that DistributedDataParallel wraps, so that its forward uses every parameter the loss needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args) -> tuple[torch.Tensor, ...]:
        return (self.model(*args), self.model.score(*args)) if has_score(self.model) else (self.model(*args),)


def data_parallel(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP (which all-reduces the gradients) around ``model``; its forward returns the flow and, for a model with
    a score head, the score."""
    return DistributedDataParallel(_FlowAndScore(model), device_ids=[device] if device.type == "cuda" else None)
