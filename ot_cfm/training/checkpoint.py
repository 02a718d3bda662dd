"""Checkpoint files: written atomically, verified and read without running any code from the file.

A checkpoint is a ``torch.save`` archive of a dict holding only tensors, numbers, strings, booleans, None,
lists, tuples and dicts, written by ``ot_cfm.utils.atomic.save_torch`` with a SHA-256 of its entries in it.
``read_checkpoint`` reads the file once, checks every entry's CRC-32 and that digest (checkpoints written
before the digest existed have none and are checked by their CRC-32s alone), then loads it with
``torch.load(weights_only=True)``, whose unpickler builds only those types: a file crafted to run code
while it is unpickled is refused before anything runs. Every failure is a ``CheckpointError`` that names
the file and says what is wrong with it.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ot_cfm.utils.atomic import save_torch, torch_archive_problem

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
    """Write ``state`` to ``path`` atomically (``ot_cfm.utils.atomic.save_torch``: a crash or a full disk leaves the
    previous file intact, the error names ``path``). Raises TypeError, before writing, for any entry that
    ``read_checkpoint`` would refuse.
    """
    check_storable(state, "state")
    save_torch(path, state)


def read_checkpoint(path: str | os.PathLike, *, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
    """The checkpoint at ``path``, its tensors on the CPU, after checking that it holds ``keys``.

    Raises CheckpointError for a missing, empty, truncated, damaged (a CRC-32 or the recorded SHA-256 does not
    match) or foreign file, and for a file holding any object other than plain data (nothing in it is executed).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    data = path.read_bytes()  # read once: what is checked is what is loaded
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write was cut short, or it is not a checkpoint")
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise CheckpointError(f"checkpoint {path} is not a torch.save archive ({len(data)} bytes without the archive's "
                              "directory at its end): it is truncated, or another kind of file")
    problem = torch_archive_problem(data)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: {problem}")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the safe unpickler refused a global, a class or an opcode
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"a reference to {refused.group(1)}" if refused else "data that torch's safe unpickler refuses"
        raise CheckpointError(
            f"refused to load checkpoint {path}: it holds something other than tensors and plain values ({what}); "
            "unpickling that could run code from the file, so it was refused unexecuted and nothing of it was "
            "loaded") from err
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
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(err).strip())  # where in torch's C++ it was found
    return text.splitlines()[0] if text else repr(err)
