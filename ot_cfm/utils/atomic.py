"""The one way the package writes a file: whole, atomically, never through a link planted at its name.

``atomic_write(path, ...)`` writes ``<name><8 random characters>.tmp`` beside ``path`` (a new file,
``O_EXCL``), flushes it to disk and renames it onto ``path``. The rename replaces whatever entry ``path``
is (a file, or a symbolic or hard link planted there) and never writes into what it points to; a
process killed mid-write leaves the temporary file behind, which ``remove_stale_temporaries`` deletes
(call it only while no live process may be writing into the folder). Folders above ``path`` are followed:
they are the caller's choice. ``append_text`` adds to a file written so, refusing a link that took its place.

``save_torch`` writes a ``torch.save`` archive this way with a SHA-256 of its entries recorded in it
(``DIGEST_NAME``), serialised in memory first so that a full disk is an OSError naming the file;
``torch_archive_problem`` says what is damaged in such an archive on reading (the zip's CRC-32 of each
entry, and that digest when the archive records one: archives of other writers have none).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import torch

__all__ = ["atomic_write", "append_text", "remove_stale_temporaries", "save_torch", "torch_archive_problem",
           "DIGEST_NAME"]

_TEMPORARY_SUFFIX = ".tmp"
_RANDOM_PART = r"[a-z0-9_]{8}"  # tempfile.mkstemp's names: prefix + 8 of [a-z0-9_] + suffix
#: the archive entry ``<root>/.data/<DIGEST_NAME>`` holding the hex SHA-256 of the archive's other entries
DIGEST_NAME = "ot_cfm_sha256"
_CHUNK = 1 << 20


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
        os.replace(tmp, path)  # rename(2) replaces the entry at path, a link included, never its target
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to the regular file ``path`` (created when missing), opened with ``O_NOFOLLOW``.

    Raises an OSError naming ``path`` when it is a symbolic link or not a regular file (nothing is written
    through it), or when the write fails. Unlike ``atomic_write`` a failure may leave part of ``text``.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(err.errno, f"could not write {path}: it is a symbolic link; refusing to write "
                                     "through it") from err
        raise _write_error(path, err) from err
    with os.fdopen(fd, "w") as f:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "it is not a regular file; refusing to write into it")
            f.write(text)
            f.flush()
        except OSError as err:
            raise _write_error(path, err) from err


def _write_error(path: Path, err: OSError) -> OSError:
    # OSError(errno, message) becomes the errno's subclass (PermissionError, ...), so callers can still tell
    reason = err.strerror or str(err)
    return OSError(err.errno, f"could not write {path}: {reason}") if err.errno else OSError(f"could not write {path}: {reason}")


def save_torch(path: str | os.PathLike, obj) -> None:
    """``torch.save(obj)`` to ``path`` through ``atomic_write``, with the SHA-256 of the archive's entries
    recorded in the entry ``<root>/.data/DIGEST_NAME`` (``torch.load`` ignores it)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        digest, _ = _entries_digest(buffer)
    except ValueError as err:  # torch.utils.serialization.config.save.compute_crc32 = False writes no CRC-32s
        raise RuntimeError(f"torch.save wrote an archive that fails its own check ({err}); is "
                           "torch.utils.serialization.config.save.compute_crc32 off?") from err
    with zipfile.ZipFile(buffer, "a") as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        archive.writestr(f"{root}/.data/{DIGEST_NAME}", digest)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()), binary=True)


def torch_archive_problem(data: bytes) -> str | None:
    """What is damaged in the zip archive ``data`` (a ``torch.save`` file), or None when every entry matches its
    CRC-32 and, when the archive records a digest (``save_torch``), the other entries match that SHA-256.

    Only uncompressed entries are read (``torch.save`` writes no other kind), so the check reads at most
    ``len(data)`` bytes.
    """
    try:
        digest, recorded = _entries_digest(io.BytesIO(data))
    except ValueError as err:
        return str(err)
    if recorded is not None and recorded != digest:
        return ("its entries do not match the SHA-256 recorded in it when it was written (the file was changed "
                "or damaged since)")
    return None


def _entries_digest(file: io.BytesIO) -> tuple[str, str | None]:
    """(hex SHA-256 of the archive's entries in order, each as name, size and bytes, leaving out the digest entry;
    the digest the archive records, or None). Raises ValueError saying which entry is damaged: reading an entry
    to its end checks its CRC-32."""
    digest, recorded, name = hashlib.sha256(), None, None
    try:
        with zipfile.ZipFile(file) as archive:
            for info in archive.infolist():
                name = info.filename
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"its entry {name} is compressed, which torch.save never writes")
                if name.endswith(f"/.data/{DIGEST_NAME}"):
                    recorded = archive.read(info).decode("ascii", "replace")
                    continue
                digest.update(f"{name}\0{info.file_size}\0".encode())
                with archive.open(info) as entry:
                    for chunk in iter(lambda: entry.read(_CHUNK), b""):
                        digest.update(chunk)
    except (zipfile.BadZipFile, EOFError, RuntimeError) as err:  # a bad CRC-32, header or size; encryption
        where = f"its entry {name}" if name is not None else "its zip directory"
        raise ValueError(f"{where} is damaged ({err})") from err
    return digest.hexdigest(), recorded


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
