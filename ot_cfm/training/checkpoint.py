"""Checkpoint files: written atomically, read without running any code from the file.

A checkpoint is a ``torch.save`` archive of a dict holding only tensors, numbers, strings, booleans, None,
lists, tuples and dicts. ``read_checkpoint`` loads it with ``torch.load(weights_only=True)``, whose
unpickler builds only those types: a file crafted to run code while it is unpickled is refused before
anything runs. Every failure is a ``CheckpointError`` that names the file and says what is wrong with it.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ot_cfm.utils.atomic import atomic_write

__all__ = ["CheckpointError", "CHECKPOINT_KEYS", "read_checkpoint", "write_checkpoint", "check_storable"]

#: the entries of a checkpoint written by ``Trainer.save_checkpoint``
CHECKPOINT_KEYS = ("step", "fingerprint", "metadata", "model", "optimizer", "scheduler", "ema", "generator")
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


class CheckpointError(ValueError):
    """A file that is not a complete, safe ot-cfm checkpoint; the message names the file and the fault."""


def check_storable(value, where: str) -> None:
    """Raise TypeError naming the first entry of ``value`` that a checkpoint cannot hold (see the module)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint key {where}[{key!r}] is a {type(key).__name__}; keys must be str or int")
            check_storable(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_storable(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"checkpoint entry {where} is a {type(value).__name__}; checkpoints hold only tensors, "
                        "numbers, strings, booleans, None, lists, tuples and dicts, so that they load without "
                        "running code (torch.load(weights_only=True))")


def write_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a crash leaves the previous file intact).

    It is serialised in memory first, so that a full disk or a failed write surfaces as an OSError naming
    ``path`` (not as an error from inside torch's archive writer). Raises TypeError, before writing, for any
    entry that ``read_checkpoint`` would refuse.
    """
    check_storable(state, "state")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()), binary=True)


def read_checkpoint(path: str | os.PathLike, *, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
    """The checkpoint at ``path``, its tensors on the CPU, after checking that it holds ``keys``.

    Raises CheckpointError for a missing, empty, truncated, corrupt or foreign file, and for a file holding
    any object other than plain data (nothing in it is executed).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write was cut short, or it is not a checkpoint")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is not a torch.save archive ({size} bytes without the archive's "
                              "directory at its end): it is truncated, or another kind of file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise CheckpointError(
                f"refused to load checkpoint {path}: it holds a reference to {refused.group(1)}, which no "
                "ot-cfm checkpoint holds (only tensors, numbers, strings, lists and dicts); unpickling it could "
                "run code from the file, so nothing of it was loaded") from err
        raise CheckpointError(f"checkpoint {path} is corrupt: {_first_line(err)}") from err
    except Exception as err:  # torch's archive reader: RuntimeError, KeyError, EOFError on damaged records
        raise CheckpointError(f"checkpoint {path} is corrupt: {type(err).__name__}: {_first_line(err)}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not an ot-cfm checkpoint: it holds a {type(state).__name__}, not a dict")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not an ot-cfm checkpoint: it lacks {missing} "
                              f"(it has {sorted(map(str, state))}); was it written by ot-cfm?")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    # torch prefixes its unpickler errors with advice about weights_only; the cause is the last part
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)  # where in torch's C++ it was found
    return text.splitlines()[0] if text else repr(err)
