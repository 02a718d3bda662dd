"""Training loop for flow-matching models: Adam, warm-up and cosine schedule, clipping, EMA,
periodic evaluation, a JSON-lines metrics log and atomic checkpoints with exact resume.

Batch k (data draws and a stochastic coupler's draws) is a pure function of (seed, k)
(``ot_cfm.training.batches``), and t and eps come from a torch.Generator saved in every checkpoint, so a
resumed run ends with the same weights as an uninterrupted one. With ``workers`` > 0 the batches are
drawn and coupled in worker processes ahead of the model step, with the same result on the CPU.

The model trains on its own device. Batches are always drawn on the CPU (so batch k is the same on every
device) and, for a coupler that solves on the CPU (exact OT), coupled there too; they reach a CUDA model
through pinned memory with ``non_blocking`` copies. On a CUDA device with no worker processes a background
thread draws and couples batch k + 1 while the GPU runs step k (``ot_cfm.training.execution``).
Started by ``torchrun`` (or in a process group the script initialised), the trainer trains data-parallel
(``ot_cfm.training.distributed``): ``DistributedDataParallel`` averages the gradients, ``batch_size`` is the global
batch of which each rank trains on B / W rows, coupled as one global problem or per rank
(``coupling_mode``), and rank 0 alone writes checkpoints, the metrics log and evaluations.
``precision`` "bf16" or "fp16" runs the model's forward and the loss under ``torch.autocast``; weights,
gradients, loss and optimizer state stay float32.
Checkpoints load without running code from the file (``ot_cfm.training.checkpoint``), and an output folder
belongs to one live run at a time (``ot_cfm.training.run_files``).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import drop_labels, is_conditional
from ot_cfm.training import run_files
from ot_cfm.training.batches import CoupledBatches, coupled_batch_stream, to_device
from ot_cfm.training.checkpoint import check_storable
from ot_cfm.training.config import TrainConfig, TrainResult
from ot_cfm.training.distributed import (
    GlobalBatches,
    LocalShards,
    all_agree,
    distributed_batch_stream,
    init_from_env,
    per_rank_batch,
    run_agreed,
)
from ot_cfm.training.ema import exponential_moving_average
from ot_cfm.training.execution import (
    PRECISIONS,
    autocast,
    check_precision,
    choose_parallelism,
    coupling_device,
    data_parallel,
    prefetch_in_thread,
)
from ot_cfm.training.run_files import CHECKPOINT_NAME, MetricsLog, claim_run_folder
from ot_cfm.utils.parallelism import torch_threads

__all__ = ["Trainer"]


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
    environment when the script has not (``ot_cfm.training.distributed.init_from_env``: gloo for a model on the CPU,
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
        self.coupling_device = coupling_device(matcher.coupler, self.device)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ema = (exponential_moving_average(model, config.ema_decay, config.ema_warmup)
                    if config.ema_decay > 0 else None)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.step = 0
        self.last_loss = float("nan")  # the last logged loss, kept in checkpoints
        self.out_dir = Path(config.out_dir) if config.out_dir else None
        self.log = MetricsLog(self.out_dir) if self.out_dir is not None else None
        # data-parallel: None in a single process (ot_cfm.training.distributed.init_from_env)
        self.distributed = init_from_env(self.device)
        self.world_size = self.distributed.world_size if self.distributed else 1
        per_rank_batch(config.batch_size, self.world_size)  # a global batch that does not split is refused now
        self.is_main = self.distributed is None or self.distributed.is_main
        # data-parallel: what the training step calls, DDP (which all-reduces the gradients) around the model
        self._ddp = data_parallel(model, self.device) if self.distributed else None

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
        with autocast(self.device, self.autocast_dtype):
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
            c = self.config
            workers, threads = choose_parallelism(self.model, self.matcher.coupler, self.batches("cpu"), c.batch_size,
                                                  c.workers, c.threads, self.distributed)
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
            self.log.truncate(self.step)

    def _check_same_step(self) -> None:
        """ValueError on every rank when the ranks start at different steps (a checkpoint some did not see)."""
        if self.distributed is None:
            return
        steps = [None] * self.world_size
        dist.all_gather_object(steps, self.step)
        if len(set(steps)) > 1:
            raise ValueError(f"the processes start at different steps {steps}: each reads {self.out_dir / CHECKPOINT_NAME} "
                             "to resume, so on several machines out_dir must be on a filesystem that all of them share")

    def _train(self, workers: int, threads: int) -> TrainResult:
        c = self.config
        start, start_step, history, losses = time.perf_counter(), self.step, [], []
        processes = f"{self.world_size} processes x " if self.distributed else ""
        bar = tqdm(total=c.steps, initial=self.step, disable=not (c.progress and self.is_main), dynamic_ncols=True,
                   desc=f"train ({processes}{workers} worker{'s' * (workers != 1)}, "
                        f"{threads} thread{'s' * (threads != 1)})")
        thread = prefetch_in_thread(self.device, workers, self.coupling_device, self.distributed, c.coupling_mode)
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
        if self.log is not None and self.is_main:
            self.log.append(row)

    def _fingerprint(self) -> dict:
        """What decides the trained weights besides the checkpointed state (``run_files.fingerprint``)."""
        return run_files.fingerprint(self)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write everything needed to resume, atomically (``ot_cfm.training.run_files.save_checkpoint``)."""
        run_files.save_checkpoint(self, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by ``save_checkpoint``; raise ValueError if it comes from another
        configuration, ``ot_cfm.training.checkpoint.CheckpointError`` (a ValueError) if it is not a safe, complete
        checkpoint (nothing in the file is executed)."""
        run_files.load_checkpoint(self, path)


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
