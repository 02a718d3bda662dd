"""The files of a run in its output folder: the folder claim, the metrics log, the checkpoint's contents and
resuming from it.

``claim_run_folder(folder)`` creates the folder, checks that files can be written in it (before any
training step, not at the first checkpoint), and holds an OS file lock on ``folder/run.lock`` until the
block ends. The operating system releases the lock when the holding process ends, however it ends (a
killed run never blocks the folder; the empty ``run.lock`` file that stays behind is harmless). A second
run into a held folder gets ``RunFolderInUseError`` at once. Claims nest within one thread (the command
line holds the folder around training, evaluation and figures; ``Trainer.fit`` claims it again); another
thread or process is refused.

``MetricsLog`` is ``metrics.jsonl``, one JSON row per logged step. A checkpoint (``checkpoint.pt``, read and
written safely by ``ot_cfm.training.checkpoint``) holds the trainer's state and a fingerprint of what decides
the trained weights besides that state; a run resumes only from a checkpoint with the same fingerprint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import stat
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from filelock import FileLock, Timeout

from ot_cfm.training.batches import DATA_STREAM
from ot_cfm.training.checkpoint import read_checkpoint, write_checkpoint
from ot_cfm.utils.atomic import append_text, atomic_write, remove_stale_temporaries

__all__ = ["RunFolderInUseError", "claim_run_folder", "LOCK_NAME", "CHECKPOINT_NAME", "METRICS_NAME", "MetricsLog",
           "fingerprint", "save_checkpoint", "load_checkpoint"]

LOCK_NAME = "run.lock"
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
# Fields added after the first checkpoints were written, with their defaults: at the default they stay out of
# the fingerprint, so checkpoints written before they existed still resume.
_LATER_FIELDS = {"label_dropout": 0.0, "precision": "fp32", "coupling_mode": "global", "ema_warmup": False}
# Fields that may change between a run and its resumption without changing the trained weights.
_RESUMABLE_FIELDS = ("steps", "out_dir", "progress", "eval_every", "checkpoint_every", "log_every", "workers",
                     "threads")

_locks: dict[str, FileLock] = {}  # one lock object per folder, so that claims nest within a thread
_locks_guard = threading.Lock()


class RunFolderInUseError(RuntimeError):
    """Another live run holds the output folder."""


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, f"output folder {folder} is not writable: {err.strerror or err}") from err


@contextlib.contextmanager
def claim_run_folder(folder: str | os.PathLike, *, outputs: Iterable[str] = ()) -> Iterator[Path]:
    """Hold ``folder`` for this run for the duration of the block; yields it as a Path.

    ``outputs`` names files the run writes with ``ot_cfm.utils.atomic.atomic_write``: their temporary files,
    left by a run killed mid-write, are deleted once the folder is held (never a live run's).
    Raises OSError naming the folder when it cannot be created or written, RunFolderInUseError when
    another live run holds it.
    """
    folder = Path(folder)
    _check_writable(folder)
    key = os.path.realpath(folder)
    with _locks_guard:
        lock = _locks.setdefault(key, FileLock(os.path.join(key, LOCK_NAME)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderInUseError(f"output folder {folder} is in use by another live run (it holds "
                                  f"{folder / LOCK_NAME}); wait for that run to end, or write to another folder"
                                  ) from None
    try:
        remove_stale_temporaries(folder, outputs)
        yield folder
    finally:
        lock.release()


class MetricsLog:
    """The run's metrics log ``folder/metrics.jsonl``: one strict-JSON object per line (a non-finite value, from an
    evaluation, is written as null).

    ``truncate``, at the start of every ``fit``, rewrites it atomically, so that whatever was at its name (a
    symbolic link planted there included) is replaced by the run's own file and never followed; ``append`` then
    adds each row to that file with ``O_NOFOLLOW`` (one write per row, not a rewrite of the whole log) and
    refuses a link put in its place later.
    """

    def __init__(self, folder: Path):
        self.path = folder / METRICS_NAME

    def append(self, row: dict) -> None:
        append_text(self.path, _json_line(row))

    def truncate(self, step: int) -> None:
        """Drop rows written after ``step`` (the checkpoint resumed from; 0 on a fresh start: all rows), and a
        last row cut short by a killed run."""
        if os.path.lexists(self.path):
            rows = [row for row in map(_parse_row, _regular_file_text(self.path).splitlines())
                    if row is not None and row.get("step", math.inf) <= step]
            atomic_write(self.path, lambda f: f.writelines(map(_json_line, rows)))


def _regular_file_text(path: Path) -> str:
    """The text of ``path`` when it is a regular file; "" for a symbolic link or any other entry (not read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOENT):
            return ""
        raise
    with os.fdopen(fd) as f:
        return f.read() if stat.S_ISREG(os.fstat(fd).st_mode) else ""


def fingerprint(trainer) -> dict:
    """What decides a trainer's weights besides its checkpointed state; a checkpoint must match it to resume.

    The samplers are not in it (functions have no stable description): name them in ``metadata``.
    """
    resumable = set(_RESUMABLE_FIELDS)
    if trainer.config.schedule == "cosine":  # the schedule's length sets the lr of every step
        resumable.discard("steps")
    if trainer.config.ema_decay == 0:  # no average: its warm-up changes nothing
        resumable.add("ema_warmup")
    for name, default in _LATER_FIELDS.items():  # at their defaults, as before they existed: earlier
        if getattr(trainer.config, name) == default:  # checkpoints still resume
            resumable.add(name)
    config = {k: v for k, v in dataclasses.asdict(trainer.config).items() if k not in resumable}
    shapes = {k: list(v.shape) for k, v in trainer.model.state_dict().items()}
    return {"config": config, "parameter_shapes": shapes, "model": repr(trainer.model),
            "data_stream": DATA_STREAM, "matcher": repr(trainer.matcher), "metadata": trainer.metadata}


def save_checkpoint(trainer, path: str | os.PathLike) -> None:
    """Write everything ``trainer`` needs to resume, atomically (``ot_cfm.training.checkpoint.write_checkpoint``)."""
    state = {"step": trainer.step, "fingerprint": fingerprint(trainer), "metadata": trainer.metadata,
             "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
             "scheduler": trainer.scheduler.state_dict(), "ema": trainer.ema.state_dict() if trainer.ema else None,
             "generator": trainer.generator.get_state(), "loss": trainer.last_loss,
             "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
             "world_size": trainer.world_size}
    write_checkpoint(path, state)


def load_checkpoint(trainer, path: str | os.PathLike) -> None:
    """Restore ``trainer`` from a checkpoint written by ``save_checkpoint``; raise ValueError if it comes from another
    configuration, ``ot_cfm.training.checkpoint.CheckpointError`` (a ValueError) if it is not a safe, complete
    checkpoint (nothing in the file is executed)."""
    state = read_checkpoint(path)
    theirs, ours = state.get("fingerprint", {}), fingerprint(trainer)
    diffs = [f"{key}: checkpoint {_short(theirs.get(key))} vs now {_short(ours[key])}" for key in ours
             if key != "config" and theirs.get(key) != ours[key]]
    # a field added later is absent from earlier checkpoints: they ran with its earlier behaviour
    diffs += [f"config.{k}: checkpoint {theirs.get('config', {}).get(k, _LATER_FIELDS.get(k))!r} vs now {v!r}"
              for k, v in ours["config"].items() if theirs.get("config", {}).get(k, _LATER_FIELDS.get(k)) != v]
    for name, default in _LATER_FIELDS.items():
        if name not in ours["config"] and theirs.get("config", {}).get(name, default) != default:
            diffs.append(f"config.{name}: checkpoint {theirs['config'][name]!r} vs now {default!r}")
    if diffs:
        hint = (" (a cosine schedule is fixed by its length: only constant-schedule runs can be extended)"
                if "steps" in ours["config"] and theirs.get("config", {}).get("steps") != trainer.config.steps else "")
        raise ValueError(f"checkpoint {path} comes from another configuration: " + "; ".join(diffs) + hint)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.ema is not None:
        trainer.ema.load_state_dict(state["ema"])
    try:
        trainer.generator.set_state(state["generator"])
    except RuntimeError as err:  # a CPU generator's state given to a CUDA one, or the reverse
        raise ValueError(f"checkpoint {path}: its t and eps generator state does not fit a generator on "
                         f"{trainer.device} ({err}); resume a run on the kind of device it was trained on") from err
    if trainer.scaler is not None and state.get("scaler"):  # fp16 runs only (the fingerprint matched)
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.last_loss = float(state.get("loss", float("nan")))  # absent from checkpoints of earlier versions
    trainer.step = state["step"]
    saved_world = int(state.get("world_size", 1))  # absent from checkpoints of single-process versions
    if saved_world != trainer.world_size and trainer.is_main:
        same = ("the same pairs, t and eps: the run continues as it would have"
                if trainer.config.coupling_mode == "global" else
                f"coupling_mode 'local' now couples {trainer.world_size} shard(s) of "
                f"{trainer.config.batch_size // trainer.world_size} instead of {saved_world}")
        warnings.warn(f"resuming {path} (step {trainer.step}), trained by {saved_world} process(es), with "
                      f"{trainer.world_size}: the global batch stays {trainer.config.batch_size}, "
                      f"{trainer.config.batch_size // trainer.world_size} rows per process; {same}",
                      stacklevel=3)  # the caller of Trainer.load_checkpoint


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
