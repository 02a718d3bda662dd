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

No wait is unbounded. ``init_from_env`` gives the processes ``OT_CFM_DIST_RENDEZVOUS_TIMEOUT`` seconds (default
60) to find each other at MASTER_ADDR:MASTER_PORT, then fails naming the torchrun variables it read: stale ones
left in the environment of a single-process command say so within that time instead of waiting for peers that
never come. Every collective of the group it initialises (the broadcasts, all-reduces and gathers of training)
fails after ``OT_CFM_DIST_TIMEOUT`` seconds (default 600, torch's default for nccl; for gloo torch waits 30
minutes) without a peer, one that died or was stopped: what rank 0 does alone between two steps (evaluation,
checkpoints) must fit in it. Both are also arguments of ``init_from_env``; a group the script initialised
itself keeps its own timeout. Torchrun variables that are no integers, or RANK outside 0 .. WORLD_SIZE - 1, are
refused at once, naming the variable.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ot_cfm.training.batches import _check_labelled, batch_generator, coupled_batch_stream
from ot_cfm.utils.validation import check_pair

__all__ = ["COUPLING_MODES", "TORCHRUN_VARIABLES", "TIMEOUT_VARIABLE", "RENDEZVOUS_TIMEOUT_VARIABLE",
           "DistributedContext", "init_from_env", "per_rank_batch",
           "GlobalBatches", "LocalShards", "distributed_batch_stream", "run_agreed", "all_agree"]

#: TrainConfig.coupling_mode values
COUPLING_MODES = ("global", "local")
#: the environment variables torchrun sets that ``init_from_env`` needs
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: seconds a collective waits for the other ranks before it fails (default 600)
TIMEOUT_VARIABLE = "OT_CFM_DIST_TIMEOUT"
#: seconds the processes have to find each other when the group starts (default 60)
RENDEZVOUS_TIMEOUT_VARIABLE = "OT_CFM_DIST_RENDEZVOUS_TIMEOUT"
_DEFAULT_SECONDS = {TIMEOUT_VARIABLE: 600.0, RENDEZVOUS_TIMEOUT_VARIABLE: 60.0}
#: the integers read from the environment (besides MASTER_ADDR): torchrun's and its LOCAL_ ones
_INTEGER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


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


def init_from_env(device: torch.device | str = "cpu", *, timeout: float | None = None,
                  rendezvous_timeout: float | None = None) -> DistributedContext | None:
    """The process group this process belongs to, or None for a single process.

    An initialised group (``dist.init_process_group`` called by the script) is used as it is. Otherwise, when
    torchrun's variables (``TORCHRUN_VARIABLES``) say WORLD_SIZE > 1, the default group is initialised from
    them with the backend for ``device`` (nccl for CUDA, else gloo) and stays initialised for the process (the
    script may ``dist.destroy_process_group()`` at its end). ``rendezvous_timeout`` (seconds; None: the
    environment's OT_CFM_DIST_RENDEZVOUS_TIMEOUT, else 60) bounds the wait for the other processes, after which
    a RuntimeError names the variables read; ``timeout`` (None: OT_CFM_DIST_TIMEOUT, else 600) bounds every
    collective of the group. ValueError: WORLD_SIZE > 1 with a variable missing, a variable that is no integer,
    RANK or LOCAL_RANK out of range, a timeout that is no positive number.
    """
    device = torch.device(device)
    if not (dist.is_available() and dist.is_initialized()):
        values = _torchrun_integers()
        world = values.get("WORLD_SIZE", 1)
        if world == 1:
            return None
        missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun, or call "
                             "torch.distributed.init_process_group before building the Trainer")
        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        _initialise(device, values["RANK"], world, _seconds(timeout, "timeout", TIMEOUT_VARIABLE),
                    _seconds(rendezvous_timeout, "rendezvous_timeout", RENDEZVOUS_TIMEOUT_VARIABLE))
    world = dist.get_world_size()
    if world == 1:
        return None
    values = _torchrun_integers(world)
    return DistributedContext(rank=dist.get_rank(), world_size=world, local_rank=values.get("LOCAL_RANK", 0),
                              local_world_size=values.get("LOCAL_WORLD_SIZE", world), backend=dist.get_backend())


def _torchrun_integers(world: int | None = None) -> dict[str, int]:
    """The integer torchrun variables that are set, checked: WORLD_SIZE (or ``world``, an initialised group's
    size) >= 1, 0 <= RANK < WORLD_SIZE, 1 <= LOCAL_WORLD_SIZE, 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE, a MASTER_PORT
    in 1 .. 65535. ValueError naming the variable otherwise."""
    values = {}
    for name in _INTEGER_VARIABLES:
        text = os.environ.get(name)
        if text is None:
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer ({_environment()}); torchrun "
                             f"sets it for each process it starts: unset it for a single process") from None
    world = values.get("WORLD_SIZE", 1) if world is None else world
    local_world = values.get("LOCAL_WORLD_SIZE", world)
    limits = {"WORLD_SIZE": (1, None), "LOCAL_WORLD_SIZE": (1, None), "RANK": (0, world - 1),
              "LOCAL_RANK": (0, local_world - 1), "MASTER_PORT": (1, 2**16 - 1)}  # the sizes first
    for name, (low, high) in limits.items():
        value = values.get(name, low)
        if value < low or (high is not None and value > high):
            expected = f">= {low}" if high is None else f"in {low} .. {high}"
            raise ValueError(f"environment variable {name}={value} must be {expected} ({_environment()}); "
                             "torchrun sets these for each process it starts: unset them for a single process")
    return values


def _environment() -> str:
    """The torchrun variables this process read, as ``NAME=value`` (or ``NAME unset``)."""
    names = TORCHRUN_VARIABLES + ("LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return ", ".join(f"{n}={os.environ[n]}" if n in os.environ else f"{n} unset" for n in names)


def _seconds(value: float | None, argument: str, variable: str) -> float:
    """A timeout in seconds: ``value`` (the ``argument``), else the environment's ``variable``, else its default;
    ValueError naming the argument or variable when it is no positive finite number."""
    name = f"{argument}="
    if value is None:
        value, name = os.environ.get(variable, _DEFAULT_SECONDS[variable]), f"environment variable {variable}="
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{name}{value!r} must be a positive number of seconds")
    return seconds


def _initialise(device: torch.device, rank: int, world: int, timeout: float, rendezvous_timeout: float) -> None:
    """``dist.init_process_group`` from torchrun's variables, its rendezvous bounded by ``rendezvous_timeout``
    seconds and its collectives by ``timeout``: the store ``init_process_group(init_method="env://")`` makes,
    made here with the shorter wait."""
    try:
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=rendezvous_timeout)))
    except (RuntimeError, OSError) as err:  # torch's DistError is a RuntimeError
        raise RuntimeError(
            f"rank {rank} of {world} did not find the other processes (it waits at most {rendezvous_timeout:g} s, "
            f"{RENDEZVOUS_TIMEOUT_VARIABLE}); it read {_environment()}. Stale torchrun variables in the environment "
            "of a single-process command: unset them. Under torchrun: start every process and check that "
            f"MASTER_ADDR:MASTER_PORT is reachable from each. (torch: {err})") from err
    store.set_timeout(timedelta(seconds=timeout))
    store = dist.PrefixStore("default_pg", store)  # as init_process_group keys its own rendezvous store
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout), device_id=device if cuda else None)


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
