"""CPU parallelism of a training run: how many worker processes couple batches, how many torch threads the
training process uses.

Measured on 2 cores shared with other processes (default ``ot-cfm train`` task: MLP width 64, batch 256,
exact coupler; 300 steps, medians of 3): one torch thread and no workers 2.1 s, two threads and no workers
24 s (11.6x: the two intra-op threads wait on each other whenever the other process holds a core), one
thread and 2 workers 1.2 s. Intra-op threads help only when each step's matrix products are large; worker
processes help only when coupling is CPU work of its own (the exact solvers).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
from typing import Iterator

import torch
from torch import nn

__all__ = ["available_cores", "auto_workers", "auto_threads", "torch_threads", "SMALL_MODEL_WORK", "MAX_AUTO_WORKERS"]

#: parameters x batch size below which a model step runs on one torch thread ("auto"); an MLP of width 256
#: (133k parameters) at batch 256 is below it, and was 30x faster on one thread than on two under load
SMALL_MODEL_WORK = 2**26
#: the most worker processes "auto" starts (more keep up with batches of a few thousand points)
MAX_AUTO_WORKERS = 8


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports it, else the CPU count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_method() -> str:
    # the start method worker processes will use, without fixing it as a side effect
    return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]


def auto_workers(coupler, batches, cores: int | None = None) -> tuple[int, str]:
    """(number of worker processes, reason) for coupling ``batches`` (a picklable ``CoupledBatches``).

    Workers only pay when coupling is CPU work that can overlap the model step (``coupler.solves_on_cpu``:
    the exact coupler, POT and scipy, alone or inside each class; ``coupler`` None keeps the drawn pairs).
    Then min(max(2, cores - 1), cores, MAX_AUTO_WORKERS): on 2 cores two workers were 1.35x faster than
    one, the model step leaving most of its core idle. Processes that do not start by
    forking receive the samplers by pickling: when they do not pickle, or live in ``__main__`` (a notebook
    or an unguarded script, which a spawned process cannot import), no workers.
    """
    cores = available_cores() if cores is None else cores
    if coupler is None:
        return 0, "no coupler: the drawn pairs are kept, nothing for workers to overlap"
    if not coupler.solves_on_cpu:
        return 0, f"coupling by {type(coupler).__name__} is not CPU work that workers could overlap"
    if cores < 2:
        return 0, "one core: workers would only share it with the model step"
    method = _start_method()
    if method != "fork":
        try:
            if b"__main__" in pickle.dumps(batches):
                return 0, f"samplers or coupler defined in __main__ cannot reach {method}ed worker processes"
        except Exception as err:  # anything unpicklable: lambdas, local functions, open files
            return 0, f"samplers or coupler do not pickle for {method}ed worker processes ({err})"
    return min(max(2, cores - 1), cores, MAX_AUTO_WORKERS), f"exact coupling is CPU work; {cores} cores"


def auto_threads(model: nn.Module, batch_size: int, workers: int, cores: int | None = None) -> int:
    """torch intra-op threads for the training process.

    One thread for a small model on the CPU (parameters x ``batch_size`` below ``SMALL_MODEL_WORK``): its
    matrix products are too small to split, and split ones stall whenever another process takes a core.
    Otherwise the cores the ``workers`` leave (at least one), never more than torch's current setting
    (which follows ``OMP_NUM_THREADS`` and earlier ``torch.set_num_threads`` calls).
    """
    cores = available_cores() if cores is None else cores
    params = sum(p.numel() for p in model.parameters())
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and params * batch_size < SMALL_MODEL_WORK:
        return 1
    return max(1, min(torch.get_num_threads(), cores - workers))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)``, then restore the previous setting."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)
