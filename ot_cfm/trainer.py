"""Training loop for flow-matching models: Adam, warm-up and cosine schedule, clipping, EMA,
periodic evaluation, a JSON-lines metrics log and atomic checkpoints with exact resume.

Batch k (data draws and a stochastic coupler's draws) is a pure function of (seed, k)
(``ot_cfm.batches``), and t and eps come from a torch.Generator saved in every checkpoint, so a
resumed run ends with the same weights as an uninterrupted one. With ``workers`` > 0 the batches are
drawn and coupled in worker processes ahead of the model step, with the same result on the CPU.

The model trains on its own device. Batches are always drawn on the CPU (so batch k is the same on every
device) and, for a coupler that solves on the CPU (exact OT), coupled there too; they reach a CUDA model
through pinned memory with ``non_blocking`` copies. On a CUDA device with no worker processes a background
thread draws and couples batch k + 1 while the GPU runs step k (``ot_cfm.batches.overlap_mode``).
Started by ``torchrun`` (or in a process group the script initialised), the trainer trains data-parallel
(``ot_cfm.distributed``): ``DistributedDataParallel`` averages the gradients, ``batch_size`` is the global
batch of which each rank trains on B / W rows, coupled as one global problem or per rank
(``coupling_mode``), and rank 0 alone writes checkpoints, the metrics log and evaluations.
``precision`` "bf16" or "fp16" runs the model's forward and the loss under ``torch.autocast``; weights,
gradients, loss and optimizer state stay float32.
Checkpoints load without running code from the file (``ot_cfm.checkpoint``), and an output folder
belongs to one live run at a time (``ot_cfm.run_folder``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from ot_cfm.batches import DATA_STREAM, CoupledBatches, coupled_batch_stream, overlap_mode, to_device
from ot_cfm.checkpoint import check_storable, read_checkpoint, write_checkpoint
from ot_cfm.distributed import (
    COUPLING_MODES,
    GlobalBatches,
    LocalShards,
    all_agree,
    distributed_batch_stream,
    init_from_env,
    per_rank_batch,
    run_agreed,
)
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import drop_labels, has_score, is_conditional
from ot_cfm.parallelism import auto_threads, auto_workers, available_cores, torch_threads
from ot_cfm.run_folder import claim_run_folder

__all__ = ["TrainConfig", "TrainResult", "Trainer", "CHECKPOINT_NAME", "METRICS_NAME", "PRECISIONS",
           "check_precision"]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
# Fields added after the first checkpoints were written, with their defaults: at the default they stay out of
# the fingerprint, so checkpoints written before they existed still resume.
_LATER_FIELDS = {"label_dropout": 0.0, "precision": "fp32", "coupling_mode": "global"}
# Fields that may change between a run and its resumption without changing the trained weights.
_RESUMABLE_FIELDS = ("steps", "out_dir", "progress", "eval_every", "checkpoint_every", "log_every", "workers",
                     "threads")
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


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    lr follows a linear warm-up over ``warmup_steps`` then ``schedule`` ("constant" or "cosine" to 0 at
    ``steps``). ``grad_clip`` > 0 clips the global gradient norm; ``ema_decay`` > 0 keeps an exponential
    moving average of the weights (used for evaluation and sampling). Checkpoints and the metrics log
    go to ``out_dir`` (none when None); a run holds ``out_dir`` while it trains, and a second live run
    into it is refused.

    ``workers`` > 0 draws and couples batches in that many worker processes while the model trains (worth
    it when the coupling is CPU work, like the exact solvers; the samplers must then draw on the CPU, and be
    picklable where processes start by spawning). ``"auto"`` (default) picks
    ``ot_cfm.parallelism.auto_workers``: for the exact coupler, min(max(2, cores - 1), cores, 8) on two or
    more cores, else 0. The weights do not depend on it.

    ``label_dropout`` (class-conditional runs only) replaces each label by the model's null label with this
    probability, drawn from the trainer's generator (so resume stays exact); it trains the unconditional field
    that classifier-free guidance needs (``ot_cfm.models.guided_field``). 0.1 is typical; 0.0 (default) for
    unconditional runs.

    ``threads`` sets torch's intra-op threads during ``fit`` (restored afterwards); None (default) picks
    ``ot_cfm.parallelism.auto_threads``: 1 for a small model on the CPU (parameters x batch_size < 2^26),
    else the cores the workers leave, never more than torch's current setting. What was chosen is in
    ``TrainResult.workers`` and ``TrainResult.threads`` and in the progress bar. With the model on a GPU
    both still count CPU work: drawing, exact coupling and pinning run on the CPU.

    ``precision``: "fp32" (default) trains in float32; "bf16" and "fp16" run the model's forward and the loss
    under ``torch.autocast`` with that dtype on the model's device (weights, gradients, loss and Adam's state
    stay float32). "fp16" adds a ``torch.amp.GradScaler`` (its state is checkpointed) and needs a GPU; the
    CPU takes "bf16". A non-default precision is part of the checkpoint fingerprint.

    Data-parallel runs (``torchrun``, ``ot_cfm.distributed``): ``batch_size`` is the GLOBAL batch, summed over
    the W processes; each trains on B / W rows (B must divide by W), so a run resumed with another number of
    processes goes on with the same global batch. ``coupling_mode`` "global" (default) couples the whole
    global batch as one problem, solved by one rank per step in turn (the pairs, t and eps one process would
    draw: the same training, whatever W); "local" couples each rank's B / W rows on their own (W smaller
    problems, so the pairs depend on W). In a single process both are the same.
    """

    steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float = 0.0
    ema_decay: float = 0.0
    seed: int = 0
    log_every: int = 100
    eval_every: int = 0
    checkpoint_every: int = 1000
    out_dir: str | None = None
    progress: bool = True
    workers: int | str = "auto"
    threads: int | None = None
    label_dropout: float = 0.0
    precision: str = "fp32"
    coupling_mode: str = "global"

    def __post_init__(self):
        if self.coupling_mode not in COUPLING_MODES:
            raise ValueError(f"coupling_mode must be one of {COUPLING_MODES}, got {self.coupling_mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.label_dropout, bool) or not isinstance(self.label_dropout, (int, float)) \
                or not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must be a probability in [0, 1], got {self.label_dropout!r}")
        if self.workers != "auto" and not (isinstance(self.workers, int) and self.workers >= 0):
            raise ValueError(f"workers must be 'auto' or an integer >= 0, got {self.workers!r}")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            raise ValueError(f"threads must be None (automatic) or an integer >= 1, got {self.threads!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.log_every < 1 or self.checkpoint_every < 1 or self.eval_every < 0:
            raise ValueError(f"log_every and checkpoint_every must be >= 1 and eval_every >= 0 (0: only at the end), "
                             f"got {self.log_every}, {self.checkpoint_every} and {self.eval_every}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("lr must be positive, warmup_steps and grad_clip non-negative")


@dataclass(frozen=True)
class TrainResult:
    """What ``fit`` reports.

    ``step``: the run's final step; ``start_step``: where this call began (the checkpoint's step on
    resume; equal to ``step`` when the resumed run had already finished, and then nothing was trained);
    ``loss``: the last logged loss of the run (NaN when none was ever logged); ``seconds``: wall time of this
    call; ``history``: the metrics rows logged by this call (evaluations on rank 0 only); ``workers`` and
    ``threads``: the worker processes and torch threads this call trained with (per process);
    ``world_size``: the number of data-parallel processes.
    """

    step: int
    loss: float
    seconds: float
    history: list
    start_step: int
    workers: int
    threads: int
    world_size: int = 1

    @property
    def steps_trained(self) -> int:
        """Optimisation steps taken by this call (0 when a finished run was resumed)."""
        return self.step - self.start_step


class Trainer:
    """Fits ``model(t, x)`` (or, class-conditional, ``model(t, x, y)``) by flow matching between a source and
    a target sampler.

    Args:
        model: the field v(t, x), an nn.Module; class-conditional when ``ot_cfm.models.is_conditional(model)``.
        matcher: a ConditionalFlowMatcher (its coupler decides minibatch OT, Sinkhorn, independent, semidiscrete;
            ``ClassConditionalCoupler`` couples within classes).
        source, target: samplers ``(n, generator) -> (n, *shape)`` drawing on the CPU (see ot_cfm.data). A
            conditional model needs a labelled target, returning ``(x, y)`` with int64 labels y (n,) in
            0 .. num_classes - 1 (``TensorSampler(data, labels, labelled=True)``); an unconditional one a plain
            target. A sampler with a ``labelled`` attribute is checked here, any other at its first batch.
        config: TrainConfig.
        evaluate: optional ``evaluate(model, step) -> dict`` of floats, called every ``eval_every`` steps
            and at the end on the EMA weights when EMA is on; its values enter the metrics log. For a conditional
            model it must pass labels itself: ``model(t, x, y)``, or sample ``guided_field(model, y, scale)``.
        metadata: facts stored in checkpoints (for example how to rebuild the model, the names of the
            samplers), made of strings, numbers, booleans, None, lists and dicts; part of the fingerprint that a
            checkpoint must match to resume.

    Under ``torchrun`` (WORLD_SIZE > 1) the constructor joins the process group, initialising it from torchrun's
    environment when the script has not (``ot_cfm.distributed.init_from_env``: gloo for a model on the CPU,
    nccl on CUDA, where each process's model must already be on its own GPU, cuda:LOCAL_RANK), and wraps the
    model in ``DistributedDataParallel`` (its forward returns the flow and, for a model with a score head, the
    score): ``distributed`` is then the process's ``DistributedContext`` (None in one process).
    Every process must build the same model (DDP starts all of them from rank 0's weights), samplers and config.
    """

    def __init__(self, model: nn.Module, matcher: ConditionalFlowMatcher, source: Callable, target: Callable,
                 config: TrainConfig = TrainConfig(), *, evaluate: Callable | None = None,
                 metadata: dict | None = None):
        self.model, self.matcher, self.source, self.target = model, matcher, source, target
        self.config, self.evaluate, self.metadata = config, evaluate, dict(metadata or {})
        self.conditional = is_conditional(model)
        _check_labels_match(self.conditional, model, target, config.label_dropout)
        check_storable(self.metadata, "metadata")  # refused now, not at the first checkpoint
        self.device = next(model.parameters()).device
        check_precision(config.precision, self.device)
        self.autocast_dtype = PRECISIONS[config.precision]
        self.scaler = (torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None)
        # where batches are coupled: the CPU when the coupler solves there (no device round trip, and the
        # same batches on every device), else the model's device
        self.coupling_device = (torch.device("cpu") if getattr(matcher.coupler, "solves_on_cpu", False)
                                else self.device)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
                    if config.ema_decay > 0 else None)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.step = 0
        self.last_loss = float("nan")  # the last logged loss, kept in checkpoints
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        # data-parallel: None in a single process (ot_cfm.distributed.init_from_env)
        self.distributed = init_from_env(self.device)
        self.world_size = self.distributed.world_size if self.distributed else 1
        per_rank_batch(config.batch_size, self.world_size)  # a global batch that does not split is refused now
        self.is_main = self.distributed is None or self.distributed.is_main
        # data-parallel: what the training step calls, DDP (which all-reduces the gradients) around the model
        self._ddp = (DistributedDataParallel(_FlowAndScore(model), device_ids=[self.device]
                                             if self.device.type == "cuda" else None) if self.distributed else None)

    @property
    def sampling_model(self) -> nn.Module:
        """The weights to sample with: the EMA copy when EMA is on, else the trained model."""
        return self.ema.module if self.ema is not None else self.model

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.schedule == "cosine":
            progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def batches(self, device: torch.device | str | None = None) -> CoupledBatches:
        """The run's coupled batches (``batches[k]`` is the batch of step k), coupled on ``device`` (by default
        the CPU for a coupler that solves on the CPU, else the model's device)."""
        c = self.config
        return CoupledBatches(self.source, self.target, self.matcher.couple, c.batch_size, c.seed,
                              device=self.coupling_device if device is None else device)

    def _autocast(self):
        """The forward's precision context: autocast to ``config.precision`` on the model's device, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def train_step(self, batch: tuple[torch.Tensor, ...] | None = None) -> float:
        """One optimisation step on ``batch`` (coupled (x0, x1), or (x0, x1, y1) with labels, of this step; drawn
        here when None); returns the loss.

        Data-parallel, ``batch`` holds this rank's B / W rows of the step's coupled global batch (as
        ``distributed_batch_stream`` yields them) and the returned loss is the mean over all ranks."""
        c = self.config
        if batch is None:
            batch = self.batches()[self.step] if self.distributed is None else next(self._stream(
                range(self.step, self.step + 1), workers=0, thread=False))
        if (len(batch) == 3) != self.conditional:
            _check_labels_match(self.conditional, self.model, _Drew(len(batch) == 3), c.label_dropout)
        x0, x1, *y1 = to_device(batch, self.device)
        self.model.train()
        with self._autocast():
            if self.distributed is not None:
                loss = self._rows_loss(x0, x1, y1[0] if y1 else None)
            elif self.conditional:
                loss = self.matcher.loss(self.model, x0, x1, generator=self.generator, coupled=True,
                                         y1=y1[0], label_dropout=c.label_dropout)
            else:
                loss = self.matcher.loss(self.model, x0, x1, generator=self.generator, coupled=True)
        loss = loss.float()  # a no-op in float32; under autocast the loss is reduced and reported in float32
        if self.distributed is not None:  # every rank sees the global mean, and stops on a non-finite one
            total = loss.detach().to(self.distributed.comm_device, copy=True)
            dist.all_reduce(total)
            reported = total / self.world_size
        else:
            reported = loss
        if not torch.isfinite(reported):
            raise RuntimeError(f"loss became {reported.item()} at step {self.step}; lower lr or enable grad_clip"
                               + (" (or train in fp32)" if self.autocast_dtype is not None else ""))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if c.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.optimizer.step()
        else:  # fp16: scaled gradients, unscaled before clipping; a step with inf/NaN gradients is skipped
            self.scaler.scale(loss).backward()
            if c.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.scaler is None:
            self.scheduler.step()
        else:  # the schedule counts training steps, also those the scaler skipped: torch's warning does not apply
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        return reported.item()

    def _rows_loss(self, x0: torch.Tensor, x1: torch.Tensor, y1: torch.Tensor | None) -> torch.Tensor:
        """The flow-matching loss of this rank's rows of the global batch, mean over them and the coordinates.

        t, eps (and dropped labels) are drawn for all B rows with the trainer's generator, as one process on
        the whole batch draws them, and this rank keeps its rows: every rank's generator stays in step with a
        single process's, and with equal shares DDP's mean of the ranks' gradients is the gradient of the
        global mean loss. A model with a score head adds the score term mean |sigma_t s(t, x_t) + eps|^2 of
        ``ConditionalFlowMatcher.loss_terms``."""
        self.matcher.check_score_head(self.model)
        rows, batch_size = self.distributed.rows(self.config.batch_size), self.config.batch_size
        full_x0 = x0.new_zeros((batch_size, *x0.shape[1:]))
        full_x1 = x1.new_zeros((batch_size, *x1.shape[1:]))
        full_x0[rows], full_x1[rows] = x0, x1
        s = self.matcher.sample(full_x0, full_x1, generator=self.generator, coupled=True)
        mine = s.select(rows)
        if self.conditional:
            full_y1 = y1.new_zeros(batch_size)
            full_y1[rows] = y1
            y = drop_labels(full_y1, self.config.label_dropout, self.model.null_label, self.generator)[rows]
            outputs = self._ddp(mine.t, mine.x_t, y)
        else:
            outputs = self._ddp(mine.t, mine.x_t)
        return self.matcher.regression_terms(mine, *outputs).total

    def _stream(self, steps: range, *, workers: int, thread: bool):
        """This process's batches of ``steps``: the coupled batches, or data-parallel this rank's rows of them."""
        c = self.config
        if self.distributed is None:
            return coupled_batch_stream(self.batches("cpu" if workers else None), steps, workers=workers,
                                        limit_threads=False, thread=thread)
        d = self.distributed
        if c.coupling_mode == "global":
            data = GlobalBatches(self.source, self.target, self.matcher.coupler, c.batch_size, c.seed, d.rank,
                                 d.world_size)
        else:
            data = LocalShards(self.source, self.target, self.matcher.couple, c.batch_size, c.seed, d.rank,
                               d.world_size)
        return distributed_batch_stream(data, steps, d, workers=workers, thread=thread)

    def fit(self, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train up to ``config.steps``; with ``resume`` continue from the checkpoint in ``out_dir`` if there is one.

        A fresh start into an ``out_dir`` that holds another run's checkpoint is refused (ValueError), so two
        runs never silently overwrite each other: pass ``resume=True`` to continue it or ``overwrite=True``
        to start over in its place (its checkpoint and training log are replaced).

        With ``out_dir``, the folder is created, checked to be writable and held for this run before the first
        step (RunFolderInUseError if another live run holds it), and temporary files of checkpoints whose
        writer was killed are deleted. A resumed run that had already reached ``config.steps`` trains nothing
        and says so (``TrainResult.steps_trained`` = 0).

        Ctrl-C (SIGINT, in the main thread) is honoured at the next step boundary: the checkpoint is
        written first, then KeyboardInterrupt propagates, so an interrupted run loses nothing.

        Data-parallel, rank 0 holds the folder and writes in it; every rank reads the checkpoint to resume (on
        several machines ``out_dir`` must be a filesystem they share: ranks that resume at different steps are
        an error), and a failure of this set-up on any rank is raised on every rank.
        """
        if resume and self.out_dir is None:
            raise ValueError("resume needs config.out_dir, where the checkpoint lives")
        with contextlib.ExitStack() as held:
            if self.out_dir is not None:
                run_agreed(self.distributed, lambda: self._open_run_folder(held, resume, overwrite))
                self._check_same_step()
            if self.step >= self.config.steps:
                return TrainResult(step=self.step, loss=self.last_loss, seconds=0.0, history=[],
                                   start_step=self.step, workers=0, threads=torch.get_num_threads(),
                                   world_size=self.world_size)
            workers, threads = self._parallelism()
            with torch_threads(threads):
                return self._train(workers, threads)

    def _open_run_folder(self, held: contextlib.ExitStack, resume: bool, overwrite: bool) -> None:
        """Hold out_dir (rank 0), load the checkpoint to resume from or refuse to start over another run's."""
        if self.is_main:
            held.enter_context(claim_run_folder(self.out_dir, outputs=(CHECKPOINT_NAME,)))
        existing = self.out_dir / CHECKPOINT_NAME
        if resume and existing.exists():
            self.load_checkpoint(existing)
        elif existing.exists() and self.step == 0 and not overwrite:  # step > 0: this trainer's own
            raise ValueError(f"{self.out_dir} holds another run (its checkpoint {existing}); continue it with "
                             "resume=True (ot-cfm train --resume), start over in its place with "
                             "overwrite=True (--overwrite), or choose another out_dir (--out)")
        if self.is_main:
            self._truncate_log()

    def _check_same_step(self) -> None:
        """ValueError on every rank when the ranks start at different steps (a checkpoint some did not see)."""
        if self.distributed is None:
            return
        steps = [None] * self.world_size
        dist.all_gather_object(steps, self.step)
        if len(set(steps)) > 1:
            raise ValueError(f"the processes start at different steps {steps}: each reads {self.out_dir / CHECKPOINT_NAME} "
                             "to resume, so on several machines out_dir must be on a filesystem that all of them share")

    def _parallelism(self) -> tuple[int, int]:
        """(workers, threads) of this process; data-parallel processes on one machine share its cores."""
        c = self.config
        local = self.distributed.local_world_size if self.distributed else 1
        cores = max(1, available_cores() // local)
        batch_size = per_rank_batch(c.batch_size, self.world_size)
        workers = (auto_workers(self.matcher.coupler, self.batches("cpu"), cores=cores)[0] if c.workers == "auto"
                   else c.workers)
        threads = c.threads if c.threads is not None else auto_threads(self.model, batch_size, workers, cores=cores)
        return workers, threads

    def _train(self, workers: int, threads: int) -> TrainResult:
        c = self.config
        start, start_step, history, losses = time.perf_counter(), self.step, [], []
        processes = f"{self.world_size} processes x " if self.distributed else ""
        bar = tqdm(total=c.steps, initial=self.step, disable=not (c.progress and self.is_main), dynamic_ncols=True,
                   desc=f"train ({processes}{workers} worker{'s' * (workers != 1)}, "
                        f"{threads} thread{'s' * (threads != 1)})")
        # Data-parallel global coupling without workers: a prefetch thread even on the CPU, so that each rank
        # solves its next step's problem ahead instead of every rank waiting at the broadcast for one solve
        # (2 processes on 2 cores, batch 256: 0.70x the step time of inline coupling, median of 3 rounds).
        thread = overlap_mode(self.device, workers, self.coupling_device) == "thread" or (
            self.distributed is not None and c.coupling_mode == "global" and workers == 0)
        batches = self._stream(range(self.step, c.steps), workers=workers, thread=thread)
        with _interrupts_at_step_boundaries() as interrupted, contextlib.closing(bar), contextlib.closing(batches):
            for batch in batches:
                losses.append(self.train_step(batch))
                bar.update(1)
                row = {}
                if self.step % c.log_every == 0 or self.step == c.steps:
                    row.update(step=self.step, loss=sum(losses) / len(losses), lr=self.scheduler.get_last_lr()[0])
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    self.last_loss, losses = row["loss"], []
                if self.is_main and self.evaluate is not None and (
                        (c.eval_every and self.step % c.eval_every == 0) or self.step == c.steps):
                    row.update(step=self.step, **self._evaluate())
                if row:
                    history.append(row)
                    self._log(row)
                stop = interrupted() if self.distributed is None else all_agree(self.distributed, interrupted())
                if self.is_main and self.out_dir is not None and (
                        stop or self.step % c.checkpoint_every == 0 or self.step == c.steps):
                    self.save_checkpoint(self.out_dir / CHECKPOINT_NAME)
                if stop:
                    if self.distributed is not None:
                        dist.barrier()  # no rank leaves (and has torchrun stop the others) before the checkpoint is written
                    raise KeyboardInterrupt(f"training interrupted at step {self.step}; checkpoint saved")
        if self.distributed is not None:
            dist.barrier()  # the last checkpoint is written before any rank returns
        return TrainResult(step=self.step, loss=self.last_loss, seconds=time.perf_counter() - start, history=history,
                           start_step=start_step, workers=workers, threads=threads, world_size=self.world_size)

    def _evaluate(self) -> dict:
        model = self.sampling_model
        was_training = model.training
        model.eval()
        try:
            return {k: float(v) for k, v in self.evaluate(model, self.step).items()}
        finally:
            model.train(was_training)

    def _log(self, row: dict) -> None:
        if self.out_dir is not None and self.is_main:
            with open(self.out_dir / METRICS_NAME, "a") as f:
                f.write(_json_line(row))

    def _truncate_log(self) -> None:
        """Drop log rows written after the checkpoint we resume from (or all rows on a fresh start), and a
        last row cut short by a killed run."""
        path = self.out_dir / METRICS_NAME
        if path.exists():
            rows = [row for row in map(_parse_row, path.read_text().splitlines())
                    if row is not None and row.get("step", math.inf) <= self.step]
            path.write_text("".join(map(_json_line, rows)))

    def _fingerprint(self) -> dict:
        """What decides the trained weights besides the checkpointed state; a checkpoint must match it to resume.

        The samplers are not in it (functions have no stable description): name them in ``metadata``.
        """
        resumable = set(_RESUMABLE_FIELDS)
        if self.config.schedule == "cosine":  # the schedule's length sets the lr of every step
            resumable.discard("steps")
        for name, default in _LATER_FIELDS.items():  # at their defaults, as before they existed: earlier
            if getattr(self.config, name) == default:  # checkpoints still resume
                resumable.add(name)
        config = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in resumable}
        shapes = {k: list(v.shape) for k, v in self.model.state_dict().items()}
        return {"config": config, "parameter_shapes": shapes, "model": repr(self.model),
                "data_stream": DATA_STREAM, "matcher": repr(self.matcher), "metadata": self.metadata}

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write everything needed to resume, atomically (``ot_cfm.checkpoint.write_checkpoint``)."""
        state = {"step": self.step, "fingerprint": self._fingerprint(), "metadata": self.metadata,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                 "generator": self.generator.get_state(), "loss": self.last_loss,
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "world_size": self.world_size}
        write_checkpoint(path, state)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by ``save_checkpoint``; raise ValueError if it comes from another
        configuration, ``ot_cfm.checkpoint.CheckpointError`` (a ValueError) if it is not a safe, complete
        checkpoint (nothing in the file is executed)."""
        state = read_checkpoint(path)
        theirs, ours = state.get("fingerprint", {}), self._fingerprint()
        diffs = [f"{key}: checkpoint {_short(theirs.get(key))} vs now {_short(ours[key])}" for key in ours
                 if key != "config" and theirs.get(key) != ours[key]]
        diffs += [f"config.{k}: checkpoint {theirs.get('config', {}).get(k)!r} vs now {v!r}"
                  for k, v in ours["config"].items() if theirs.get("config", {}).get(k) != v]
        for name, default in _LATER_FIELDS.items():
            if name not in ours["config"] and theirs.get("config", {}).get(name, default) != default:
                diffs.append(f"config.{name}: checkpoint {theirs['config'][name]!r} vs now {default!r}")
        if diffs:
            hint = (" (a cosine schedule is fixed by its length: only constant-schedule runs can be extended)"
                    if "steps" in ours["config"] and theirs.get("config", {}).get("steps") != self.config.steps else "")
            raise ValueError(f"checkpoint {path} comes from another configuration: " + "; ".join(diffs) + hint)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        try:
            self.generator.set_state(state["generator"])
        except RuntimeError as err:  # a CPU generator's state given to a CUDA one, or the reverse
            raise ValueError(f"checkpoint {path}: its t and eps generator state does not fit a generator on "
                             f"{self.device} ({err}); resume a run on the kind of device it was trained on") from err
        if self.scaler is not None and state.get("scaler"):  # fp16 runs only (the fingerprint matched)
            self.scaler.load_state_dict(state["scaler"])
        self.last_loss = float(state.get("loss", float("nan")))  # absent from checkpoints of earlier versions
        self.step = state["step"]
        saved_world = int(state.get("world_size", 1))  # absent from checkpoints of single-process versions
        if saved_world != self.world_size and self.is_main:
            same = ("the same pairs, t and eps: the run continues as it would have"
                    if self.config.coupling_mode == "global" else
                    f"coupling_mode 'local' now couples {self.world_size} shard(s) of "
                    f"{self.config.batch_size // self.world_size} instead of {saved_world}")
            warnings.warn(f"resuming {path} (step {self.step}), trained by {saved_world} process(es), with "
                          f"{self.world_size}: the global batch stays {self.config.batch_size}, "
                          f"{self.config.batch_size // self.world_size} rows per process; {same}", stacklevel=2)


class _FlowAndScore(nn.Module):
    """``model(*args)``, and ``model.score(*args)`` for a model with a score head, in one forward: the module
    that DistributedDataParallel wraps, so that its forward uses every parameter the loss needs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args) -> tuple[torch.Tensor, ...]:
        return (self.model(*args), self.model.score(*args)) if has_score(self.model) else (self.model(*args),)


class _Drew:
    """Stands for a target sampler whose first batch showed whether it is labelled."""

    def __init__(self, labelled: bool):
        self.labelled = labelled


def _check_labels_match(conditional: bool, model: nn.Module, target, label_dropout: float) -> None:
    """ValueError unless labels come exactly when the model is conditional, and dropout only with labels."""
    name = type(model).__name__
    labelled = getattr(target, "labelled", None)
    if conditional and labelled is False:
        raise ValueError(f"the model is class-conditional ({name} with num_classes={model.num_classes}) but the "
                         "target sampler returns no labels; use a labelled sampler returning (x, y), e.g. "
                         "TensorSampler(data, labels, labelled=True), or an unconditional model")
    if not conditional and labelled is True:
        raise ValueError(f"the target sampler returns labels (x, y) but the model ({name}) is unconditional; build it "
                         "with num_classes (e.g. MLP(dim, num_classes=K)) or use an unlabelled sampler")
    if label_dropout > 0 and not conditional:
        raise ValueError(f"label_dropout={label_dropout} needs a class-conditional model; {name} is unconditional "
                         "(set label_dropout=0.0 or build the model with num_classes)")


def _json_line(row: dict) -> str:
    # strict JSON (no NaN or Infinity tokens): a non-finite value, from an evaluation, is written as null
    finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


def _parse_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:  # a row cut short when its run was killed
        return None
    return row if isinstance(row, dict) else None


def _short(value, limit: int = 200) -> str:
    """repr of a fingerprint entry, cut to ``limit`` characters (model descriptions run to pages)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


@contextlib.contextmanager
def _interrupts_at_step_boundaries():
    """Turn the first SIGINT into a flag read between steps (a second one interrupts at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    received = []

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGINT, previous)
