"""The settings of a training run (``TrainConfig``) and what ``Trainer.fit`` reports (``TrainResult``)."""

from __future__ import annotations

from dataclasses import dataclass

from ot_cfm.training.distributed import COUPLING_MODES
from ot_cfm.training.execution import PRECISIONS
from ot_cfm.utils.validation import check_seed

__all__ = ["TrainConfig", "TrainResult"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    lr follows a linear warm-up over ``warmup_steps`` then ``schedule`` ("constant" or "cosine" to 0 at
    ``steps``). ``grad_clip`` > 0 clips the global gradient norm; ``ema_decay`` > 0 keeps an exponential
    moving average of the weights (used for evaluation and sampling), whose decay after step k is
    min(ema_decay, (1 + k) / (10 + k)) with ``ema_warmup`` (default), so that a short run's average is not mostly
    its initial weights, or ema_decay throughout without it (``ot_cfm.training.ema``). Checkpoints and the metrics log
    go to ``out_dir`` (none when None); a run holds ``out_dir`` while it trains, and a second live run
    into it is refused.

    ``workers`` > 0 draws and couples batches in that many worker processes while the model trains (worth
    it when the coupling is CPU work, like the exact solvers; the samplers must then draw on the CPU, and be
    picklable where processes start by spawning). ``"auto"`` (default) picks
    ``ot_cfm.utils.parallelism.auto_workers``: for the exact coupler, min(max(2, cores - 1), cores, 8) on two or
    more cores, else 0. The weights do not depend on it.

    ``label_dropout`` (class-conditional runs only) replaces each label by the model's null label with this
    probability, drawn from the trainer's generator (so resume stays exact); it trains the unconditional field
    that classifier-free guidance needs (``ot_cfm.models.guided_field``). 0.1 is typical; 0.0 (default) for
    unconditional runs.

    ``threads`` sets torch's intra-op threads during ``fit`` (restored afterwards); None (default) picks
    ``ot_cfm.utils.parallelism.auto_threads``: 1 for a small model on the CPU (parameters x batch_size < 2^26),
    else the cores the workers leave, never more than torch's current setting. What was chosen is in
    ``TrainResult.workers`` and ``TrainResult.threads`` and in the progress bar. With the model on a GPU
    both still count CPU work: drawing, exact coupling and pinning run on the CPU.

    ``precision``: "fp32" (default) trains in float32; "bf16" and "fp16" run the model's forward and the loss
    under ``torch.autocast`` with that dtype on the model's device (weights, gradients, loss and Adam's state
    stay float32). "fp16" adds a ``torch.amp.GradScaler`` (its state is checkpointed) and needs a GPU; the
    CPU takes "bf16". A non-default precision is part of the checkpoint fingerprint.

    Data-parallel runs (``torchrun``, ``ot_cfm.training.distributed``): ``batch_size`` is the GLOBAL batch, summed over
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
    ema_warmup: bool = True
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
        check_seed(self.seed)
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
