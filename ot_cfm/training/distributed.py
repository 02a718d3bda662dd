"""Data-parallel training over processes with ``torch.distributed``, and minibatch couplings across ranks.

Launched by ``torchrun --nproc_per_node=N`` (``--nnodes`` for several machines), ``Trainer`` finds the process
group (``init_from_env``: it initialises one from torchrun's environment variables when the script has not,
gloo for a model on the CPU, nccl on CUDA), wraps the model in ``DistributedDataParallel`` and trains on a
share of each global batch. ``TrainConfig.batch_size`` is the GLOBAL batch B: rank r trains on its rows
``r B / W .. (r + 1) B / W`` of step k's coupled batch (W the world size; B must divide by W).

Batch k is a pure function of (seed, k) (``ot_cfm.training.batches``), so every rank draws the whole global batch
(B points of each side: cheap next to a coupling) and the two coupling modes differ only in what is solved:

- ``"global"``: one coupling of the whole global batch, the pairs one process would train on. Step k's problem
  is solved by rank k mod W alone and that rank broadcasts only the index pairs (i, j), 2 B integers, when the
  step comes; per step and rank that is 1 / W of a global solve. Each rank solves its steps ahead while the
  model trains, in its worker processes (``TrainConfig.workers``) or, with none, in a prefetch thread (the
  Trainer uses one in this mode even on the CPU): it has W steps of time for each solve. Inline (no thread,
  no workers: ``distributed_batch_stream(..., thread=False)``) the owner would solve at the step while the
  others wait at the broadcast.
  ``GlobalBatches`` and ``distributed_batch_stream``.
- ``"local"``: rank r couples its own rows (B / W noise with B / W data), as torchcfm's DDP recipe does:
  W solves of size B / W per step, one on each rank, no communication. ``LocalShards``.

At W = 1 both are the single-process stream, batch for batch.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ot_cfm.training.batches import _check_labelled, batch_generator, coupled_batch_stream
from ot_cfm.utils.validation import check_pair

__all__ = ["COUPLING_MODES", "TORCHRUN_VARIABLES", "DistributedContext", "init_from_env", "per_rank_batch",
           "GlobalBatches", "LocalShards", "distributed_batch_stream", "run_agreed", "all_agree"]

#: TrainConfig.coupling_mode values
COUPLING_MODES = ("global", "local")
#: the environment variables torchrun sets that ``init_from_env`` needs
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the process group: ``rank`` of ``world_size``, ``local_rank`` of
    ``local_world_size`` on its machine, and the group's ``backend`` ("gloo" or "nccl")."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and evaluations and shows progress."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must lie for this backend's collectives (nccl: this rank's CUDA device)."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size``: ``rank * b .. (rank + 1) * b``, b = B / W."""
        b = per_rank_batch(batch_size, self.world_size)
        return slice(self.rank * b, (self.rank + 1) * b)


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """B / W, or ValueError when the global batch ``batch_size`` does not divide into ``world_size`` equal shares."""
    if batch_size % world_size:
        raise ValueError(f"the global batch_size {batch_size} does not divide by the world size {world_size}: every "
                         f"process trains on batch_size / world_size rows; choose a multiple of {world_size} "
                         f"(for example {batch_size - batch_size % world_size or world_size}) or another number of "
                         "processes")
    return batch_size // world_size


def init_from_env(device: torch.device | str = "cpu") -> DistributedContext | None:
    """The process group this process belongs to, or None for a single process.

    An initialised group (``dist.init_process_group`` called by the script) is used as it is. Otherwise, when
    torchrun's variables (``TORCHRUN_VARIABLES``) say WORLD_SIZE > 1, the default group is initialised from
    them with the backend for ``device`` (nccl for CUDA, else gloo) and stays initialised for the process (the
    script may ``dist.destroy_process_group()`` at its end). WORLD_SIZE > 1 with a variable missing is a
    ValueError naming it.
    """
    device = torch.device(device)
    if not (dist.is_available() and dist.is_initialized()):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun, or call "
                             "torch.distributed.init_process_group before building the Trainer")
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    world = dist.get_world_size()
    if world == 1:
        return None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return DistributedContext(rank=dist.get_rank(), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                              local_world_size=local_world, backend=dist.get_backend())


def _draw(source: Callable, target: Callable, batch_size: int, generator: torch.Generator):
    """(x0, x1, y1 or None): global batch k's draws, as ``CoupledBatches`` makes them."""
    x0 = source(batch_size, generator)
    drawn = target(batch_size, generator)
    if isinstance(drawn, (tuple, list)):
        return (x0, *_check_labelled(drawn, batch_size))
    return x0, drawn, None


def _indices(coupler, x0: torch.Tensor, x1: torch.Tensor, y1: torch.Tensor | None,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The coupler's (i, j) for the batch, the pairs ``ConditionalFlowMatcher.couple`` would make."""
    if coupler is None:
        rows = torch.arange(x0.shape[0], device=x0.device)
        return rows, rows
    check_pair(x0, x1, same_batch_size=coupler.requires_equal_sizes)
    if y1 is not None and coupler.takes_labels:  # couples within classes
        return coupler.indices(x0, x1, generator=generator, y1=y1)
    return coupler.indices(x0, x1, generator=generator)


class GlobalBatches(Dataset):
    """``batches[k]`` = (idx, error, x0, x1[, y1]) for ``coupling_mode="global"``: the whole global batch k
    (x0, x1 (B, *shape), labels y1 (B,)) drawn with ``batch_generator(seed, k)``, and, on the rank that owns
    step k (k mod W == rank), its coupling idx = stack(i, j), (2, B) int64, solved with the same generator
    after the draws, so the pairs (x0[i], x1[j], y1[j]) are those of one process; on other ranks idx is
    (2, 0). A failed solve gives idx filled with -1 and its traceback in ``error`` (uint8), so every rank
    learns of it at the broadcast instead of waiting for a permutation that never comes.
    Picklable (for worker processes) when the samplers and coupler are."""

    def __init__(self, source: Callable, target: Callable, coupler, batch_size: int, seed: int, rank: int,
                 world_size: int):
        self.source, self.target, self.coupler = source, target, coupler
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return 2**62

    def owner(self, step: int) -> int:
        """The rank that solves step ``step``'s global coupling."""
        return step % self.world_size

    def __getitem__(self, step: int) -> tuple[torch.Tensor, ...]:
        generator = batch_generator(self.seed, step)
        x0, x1, y1 = _draw(self.source, self.target, self.batch_size, generator)
        idx, error = torch.empty((2, 0), dtype=torch.int64), ""
        if self.owner(step) == self.rank:
            try:
                i, j = _indices(self.coupler, x0, x1, y1, generator)
                if i.shape != (self.batch_size,) or j.shape != (self.batch_size,):
                    raise ValueError(f"coupling_mode='global' needs a coupler that returns one pair per row of the "
                                     f"global batch ({self.batch_size}); {type(self.coupler).__name__} returned "
                                     f"{tuple(i.shape)} and {tuple(j.shape)} indices")
                idx = torch.stack([i, j]).to(torch.int64).cpu()
            except Exception:  # handed to every rank at the broadcast (see the class)
                idx, error = torch.full((2, self.batch_size), -1, dtype=torch.int64), traceback.format_exc()
        message = torch.frombuffer(bytearray(error.encode()), dtype=torch.uint8) if error else torch.empty(0, dtype=torch.uint8)
        return (idx, message, x0, x1) + (() if y1 is None else (y1,))


class LocalShards(Dataset):
    """``batches[k]`` = (x0, x1[, y1]) for ``coupling_mode="local"``: this rank's rows r B / W .. (r + 1) B / W
    of global batch k (drawn with ``batch_generator(seed, k)``), coupled on their own by ``couple`` (a matcher's
    ``couple``) with a generator seeded from the same stream (one draw per rank after the points), so
    stochastic couplers draw independently on each rank."""

    def __init__(self, source: Callable, target: Callable, couple: Callable | None, batch_size: int, seed: int,
                 rank: int, world_size: int):
        self.source, self.target, self.couple = source, target, couple
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.rows = slice(rank * per_rank_batch(batch_size, world_size),
                          (rank + 1) * per_rank_batch(batch_size, world_size))
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> tuple[torch.Tensor, ...]:
        generator = batch_generator(self.seed, step)
        x0, x1, y1 = _draw(self.source, self.target, self.batch_size, generator)
        seeds = torch.randint(2**62, (self.world_size,), generator=generator)
        shard = torch.Generator().manual_seed(int(seeds[self.rank]))
        x0, x1 = x0[self.rows], x1[self.rows]
        if y1 is None:
            return tuple(self.couple(x0, x1, generator=shard)[:2]) if self.couple is not None else (x0, x1)
        y1 = y1[self.rows]
        if self.couple is None:
            return x0, x1, y1
        x0, x1, _, y1 = self.couple(x0, x1, None, y1, generator=shard)
        return x0, x1, y1


def distributed_batch_stream(batches: GlobalBatches | LocalShards, steps: range, context: DistributedContext, *,
                             workers: int = 0, prefetch: int = 2, thread: bool = False) -> Iterator[tuple]:
    """This rank's coupled rows of each step in ``steps``, in order: (x0, x1[, y1]), each (B / W, ...).

    The batches are computed ahead as ``coupled_batch_stream`` does (``workers`` processes, or a ``thread``,
    ``prefetch`` batches ahead). For ``GlobalBatches``, at step k the owner broadcasts its idx (2, B) to every
    rank, a blocking collective that every rank enters at step k; each keeps its rows i[r B/W : (r+1) B/W]
    of x0 and the matching j of x1 (and y1). A failed solve raises RuntimeError on every rank.
    """
    stream = coupled_batch_stream(batches, steps, workers=workers, prefetch=prefetch, limit_threads=False,
                                  thread=thread)
    if isinstance(batches, LocalShards):
        yield from stream
        return
    rows = context.rows(batches.batch_size)
    try:
        for step, (idx, error, x0, x1, *y1) in zip(steps, stream):
            owner = batches.owner(step)
            if owner != context.rank:
                idx = torch.empty((2, batches.batch_size), dtype=torch.int64)
            shared = idx.to(context.comm_device)
            dist.broadcast(shared, src=owner)
            if error.numel():
                raise RuntimeError(f"coupling of step {step} failed on this rank (its owner):\n"
                                   + bytes(error.tolist()).decode())
            if int(shared[0, 0]) < 0:
                raise RuntimeError(f"rank {owner} failed to couple step {step}'s global batch; its error is in "
                                   "that rank's output")
            i, j = shared[:, rows].cpu()
            yield (x0[i], x1[j]) + tuple(y[j] for y in y1)
    finally:
        stream.close()


def all_agree(context: DistributedContext, flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (an all-reduce of one number)."""
    value = torch.tensor([float(flag)], device=context.comm_device)
    dist.all_reduce(value)
    return bool(value.item() > 0)


def run_agreed(context: DistributedContext | None, action: Callable[[], object]):
    """``action()`` on every rank, then agreement: when it raised on any rank, it raises on every rank (the
    rank's own exception, or RuntimeError naming the failed ranks and their messages), so no rank goes on to
    wait in a collective for one that stopped. Without ``context``, just ``action()``."""
    if context is None:
        return action()
    try:
        result, failure, error = action(), "", None
    except Exception as err:  # gathered below and raised again on this rank
        result, failure, error = None, f"{type(err).__name__}: {err}", err
    failures = [None] * context.world_size
    dist.all_gather_object(failures, failure)
    if error is not None:
        raise error
    failed = {rank: text for rank, text in enumerate(failures) if text}
    if failed:
        raise RuntimeError("another process of the run failed: " + "; ".join(f"rank {r}: {t}" for r, t in failed.items()))
    return result
