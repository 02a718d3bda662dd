"""An output folder belongs to one live run at a time.

``claim_run_folder(folder)`` creates the folder, checks that files can be written in it (before any
training step, not at the first checkpoint), and holds an OS file lock on ``folder/run.lock`` until the
block ends. The operating system releases the lock when the holding process ends, however it ends (a
killed run never blocks the folder; the empty ``run.lock`` file that stays behind is harmless). A second
run into a held folder gets ``RunFolderInUseError`` at once. Claims nest within one thread (the command
line holds the folder around training, evaluation and figures; ``Trainer.fit`` claims it again); another
thread or process is refused.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from filelock import FileLock, Timeout

from ot_cfm.atomic import remove_stale_temporaries

__all__ = ["RunFolderInUseError", "claim_run_folder", "LOCK_NAME"]

LOCK_NAME = "run.lock"
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

    ``outputs`` names files the run writes with ``ot_cfm.atomic.atomic_write``: their temporary files,
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
