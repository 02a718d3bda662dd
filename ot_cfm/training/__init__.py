"""Training a field by flow matching: the loop, its settings, its batches, its files and how it executes.

- ``trainer``: ``Trainer``, the training loop (Adam, warm-up and cosine schedule, clipping, EMA, evaluation).
- ``config``: ``TrainConfig`` (a run's settings) and ``TrainResult`` (what ``Trainer.fit`` reports).
- ``batches``: batch k as a pure function of (seed, k), coupled inline, in a thread or in worker processes.
- ``distributed``: data-parallel training under ``torchrun``, with one global coupling or one per rank.
- ``execution``: precision, where batches are coupled, workers and threads, the data-parallel wrapper.
- ``run_files``: the output folder's claim, the metrics log, the checkpoint's fingerprint, save and resume.
- ``checkpoint``: reading and writing checkpoint files without running code from them.
"""

from ot_cfm.training.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from ot_cfm.training.config import TrainConfig, TrainResult
from ot_cfm.training.distributed import COUPLING_MODES, DistributedContext, init_from_env
from ot_cfm.training.execution import PRECISIONS, check_precision
from ot_cfm.training.run_files import CHECKPOINT_NAME, METRICS_NAME, RunFolderInUseError, claim_run_folder
from ot_cfm.training.trainer import Trainer

__all__ = ["Trainer", "TrainConfig", "TrainResult", "CHECKPOINT_NAME", "METRICS_NAME", "PRECISIONS", "check_precision",
           "COUPLING_MODES", "DistributedContext", "init_from_env", "claim_run_folder", "RunFolderInUseError",
           "CheckpointError", "read_checkpoint", "write_checkpoint"]
