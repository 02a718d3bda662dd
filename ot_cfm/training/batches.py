"""The stream of coupled training batches, reproducible batch by batch and computable ahead in worker processes.

Batch k is a pure function of (seed, k): its draws come from ``batch_generator(seed, k)``, so

    x0 = source(B, g_k),  x1 = target(B, g_k),  (x0, x1) <- coupler(x0, x1, generator=g_k).

A resumed run therefore needs no data-generator state, and batches can be drawn and coupled by
``torch.utils.data.DataLoader`` worker processes while the training process runs the model step:
the exact OT solve (POT, scipy) is CPU work of its own, which workers take off the step's critical path
(``benchmarks/results/toy_training.md``). On the CPU the batches do not depend on the number of workers.

For a model on a GPU the points are still drawn on the CPU (the same batch k on every device) and an exact
coupler still solves there; ``to_device`` moves a batch through pinned memory with ``non_blocking`` copies,
and with no worker processes ``coupled_batch_stream(..., thread=True)`` computes the next batches in one
background thread while the GPU runs the current step (``overlap_mode`` decides).
"""

from __future__ import annotations

import collections
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ot_cfm.utils.parallelism import available_cores
from ot_cfm.utils.validation import check_labels

__all__ = ["DATA_STREAM", "batch_generator", "CoupledBatches", "coupled_batch_stream", "overlap_mode", "to_device"]

#: names how batch k is drawn; results stored with another name (checkpoints, cached experiment cells) were
#: trained on other data and are refused or recomputed
DATA_STREAM = "ot_cfm.training.batches.batch_generator(seed, step)"
_MASK64 = (1 << 64) - 1


def batch_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded by the splitmix64 hash of (seed, step).

    torch's CPU engine (mt19937) keeps 32 bits of its seed; the hash spreads (seed, step) over them.
    """
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return torch.Generator().manual_seed(z ^ (z >> 31))


class CoupledBatches(Dataset):
    """``batches[k]`` = (x0, x1), each (batch_size, *shape): batch k drawn from ``source`` and ``target`` with
    ``batch_generator(seed, k)`` and paired by ``couple(x0, x1, generator=...)`` (a matcher's ``couple``, or
    None to keep the i.i.d. pairing). Points are drawn on the CPU and coupled on ``device``.

    A labelled target (one returning ``(x1, y1)``, e.g. ``TensorSampler(data, labels, labelled=True)``) gives
    ``batches[k]`` = (x0, x1, y1): the labels (batch_size,) are coupled with their points,
    ``couple(x0, x1, None, y1, generator=...)``, and travel through worker processes with them."""

    def __init__(self, source: Callable, target: Callable, couple: Callable | None, batch_size: int, seed: int,
                 device: torch.device | str = "cpu"):
        self.source, self.target, self.couple = source, target, couple
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)

    def __len__(self) -> int:
        return 2**62  # indexed by step; the sampler decides which steps are drawn

    def __getitem__(self, step: int) -> tuple[torch.Tensor, ...]:
        generator = batch_generator(self.seed, step)
        x0 = self.source(self.batch_size, generator).to(self.device)
        x1 = self.target(self.batch_size, generator)
        if isinstance(x1, (tuple, list)):  # a labelled target: (x1, y1)
            return self._labelled(x0, *_check_labelled(x1, self.batch_size), generator)
        x1 = x1.to(self.device)
        if self.couple is not None:
            x0, x1 = self.couple(x0, x1, generator=generator)[:2]
        return x0, x1

    def _labelled(self, x0: torch.Tensor, x1: torch.Tensor, y1: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x1, y1 = x1.to(self.device), y1.to(self.device)
        if self.couple is not None:
            x0, x1, _, y1 = self.couple(x0, x1, None, y1, generator=generator)
        return x0, x1, y1


def _check_labelled(drawn, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x1, y1) from a labelled target's draw, or ValueError naming what came back."""
    if len(drawn) != 2 or not all(isinstance(t, torch.Tensor) for t in drawn):
        raise ValueError(f"a target sampler returns a tensor (n, *shape) or, labelled, a pair (x, y) of tensors; "
                         f"got a {type(drawn).__name__} of {len(drawn)} items")
    x1, y1 = drawn
    check_labels(y1, x1.shape[0], "the labels y of a labelled target sampler")
    if x1.shape[0] != batch_size:
        raise ValueError(f"the target sampler returned {x1.shape[0]} points; expected {batch_size}")
    return x1, y1


def _ignore_sigint(worker_id: int) -> None:
    # The training process turns Ctrl-C into a checkpoint at the next step boundary; its workers must
    # keep serving batches until then instead of dying on the same signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _to_bytes(batch: tuple[torch.Tensor, ...]) -> list:
    # Tensors cross the process boundary as numpy byte arrays (pickled by value): torch's shared-memory
    # hand-off took 2 ms per batch and pickling a tensor 0.4 ms, against 10 us for this (B = 256, d = 2).
    return [(t.dtype, t.shape, t.contiguous().reshape(-1).view(torch.uint8).numpy()) for t in batch]


def _from_bytes(parts: list) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(data).view(dtype).reshape(shape) for dtype, shape, data in parts)


def overlap_mode(device: torch.device | str, workers: int, coupling_device: torch.device | str) -> str:
    """How a training process gets its batches ahead of the model step on ``device``:

    "workers" (``workers`` > 0: worker processes), "thread" (a model off the CPU, batches coupled on the CPU,
    no workers: one background thread draws and couples batch k + 1 while the device runs step k; the GPU step
    is queued asynchronously, so the CPU is free for it) or "inline" (each batch when it is needed: on the CPU
    a thread would only compete with the step for the same cores, and a coupler solving on the device has
    no CPU work to overlap).
    """
    if workers > 0:
        return "workers"
    if torch.device(device).type != "cpu" and torch.device(coupling_device).type == "cpu":
        return "thread"
    return "inline"


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """``batch`` on ``device``: unchanged where it already is; to CUDA from pinned (page-locked) memory with
    ``non_blocking`` copies, so the copy is queued behind the GPU's work instead of waiting for it."""
    device = torch.device(device)
    if device.type != "cuda":
        return tuple(t.to(device) for t in batch)
    return tuple(t if t.device.type == "cuda" else _pinned(t).to(device, non_blocking=True) for t in batch)


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_pinned() else t.pin_memory()


def coupled_batch_stream(batches: CoupledBatches, steps: range, *, workers: int = 0, prefetch: int = 2,
                         limit_threads: bool = True, thread: bool = False):
    """A generator of ``batches[k]`` for k in ``steps``, in order (``close()`` it to stop early).

    ``workers`` = 0 computes each batch in this process when it is asked for, or with ``thread`` in one
    background thread, up to ``prefetch`` batches ahead of the consumer (the same batches: each is a pure
    function of its step); ``workers`` > 0 computes them in that many worker processes (on the CPU), up to
    ``prefetch`` batches per worker ahead of the consumer, and, with ``limit_threads`` and until the stream
    ends or is closed, limits this process's torch threads to the cores the workers leave (``Trainer`` sets
    its threads itself and passes False).
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0 and thread:
        return _threaded(batches, steps, max(1, prefetch))
    if workers == 0:
        return (batches[k] for k in steps)
    if batches.device.type != "cpu":
        raise ValueError(f"worker processes couple on the CPU; build CoupledBatches with device='cpu', "
                         f"not {batches.device}")
    loader = DataLoader(batches, batch_size=None, sampler=steps, num_workers=workers, prefetch_factor=prefetch,
                        collate_fn=_to_bytes, worker_init_fn=_ignore_sigint)
    return _closing_iteration(loader, limit_threads)


def _threaded(batches: CoupledBatches, steps: range, prefetch: int):
    # One thread, so batches are computed in order and at most one coupler call runs at a time (the
    # couplers need not be thread-safe against themselves). An error in batch k is raised at batch k.
    # Closing the stream cancels the batches not yet started and waits for the one running.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ot-cfm-batches") as pool:
        ahead, queued = collections.deque(), iter(steps)
        try:
            for k in queued:
                ahead.append(pool.submit(batches.__getitem__, k))
                if len(ahead) > prefetch:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()


def _closing_iteration(loader: DataLoader, limit_threads: bool):
    # While the workers run, this process's torch keeps to the cores they leave (at least one): with two
    # intra-op threads beside two workers on 2 cores, a toy step (B = 256) took 1.8x as long as with one.
    previous = torch.get_num_threads()
    if limit_threads:
        torch.set_num_threads(max(1, min(previous, available_cores() - loader.num_workers)))
    iterator = iter(loader)
    try:
        for parts in iterator:
            yield _from_bytes(parts)
    finally:
        del iterator  # a released DataLoader iterator shuts its workers down: closing the stream stops them
        torch.set_num_threads(previous)
