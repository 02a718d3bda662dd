"""Atomic file writes: an interrupted run never leaves a truncated checkpoint or result.

``atomic_write(path, ...)`` writes ``<name><8 random characters>.tmp`` beside ``path`` and renames it; a
process killed mid-write leaves that temporary file behind, which ``remove_stale_temporaries`` deletes
(call it only while no live process may be writing into the folder).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["atomic_write", "remove_stale_temporaries"]

_TEMPORARY_SUFFIX = ".tmp"
_RANDOM_PART = r"[a-z0-9_]{8}"  # tempfile.mkstemp's names: prefix + 8 of [a-z0-9_] + suffix


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable, *, binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, flush it to disk, then rename it to ``path``.

    A failed write (full disk, no permission, read-only file system) raises an OSError of the same errno
    whose message names ``path``; the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=_TEMPORARY_SUFFIX)
    except OSError as err:
        raise _write_error(path, err) from err
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600: give the mode a plain open() would
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(path: Path, err: OSError) -> OSError:
    # OSError(errno, message) becomes the errno's subclass (PermissionError, ...), so callers can still tell
    reason = err.strerror or str(err)
    return OSError(err.errno, f"could not write {path}: {reason}") if err.errno else OSError(f"could not write {path}: {reason}")


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that ``atomic_write`` left in ``folder`` for the files ``names`` when its
    process died mid-write; return the paths deleted. Other files are never touched."""
    folder = Path(folder)
    patterns = [re.compile(re.escape(name) + _RANDOM_PART + re.escape(_TEMPORARY_SUFFIX)) for name in names]
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        if entry.is_file() and any(p.fullmatch(entry.name) for p in patterns):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
