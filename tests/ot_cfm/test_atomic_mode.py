"""atomic_write gives its file the mode a plain open() would: 0o666 less the process's umask."""

import os
import stat

import pytest

from ot_cfm.utils.atomic import atomic_write


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_file_follows_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        atomic_write(tmp_path / "result.txt", lambda f: f.write("x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "result.txt").stat().st_mode) == 0o666 & ~mask
