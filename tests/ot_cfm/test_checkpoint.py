"""Checkpoints load without running code, name the file on every fault, and fail loudly on a full disk."""

import errno
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from ot_cfm.cli import main
from ot_cfm.data import toy_sampler
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import CHECKPOINT_NAME, TrainConfig, Trainer
from ot_cfm.training.checkpoint import CHECKPOINT_KEYS, CheckpointError, read_checkpoint
from ot_cfm.utils import atomic


class WritesAFile:
    """Unpickling this calls exec, which writes ``path``: what a crafted checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('code ran')",)


def trainer(folder, **overrides):
    torch.manual_seed(0)
    config = dict(out_dir=str(folder), steps=6, batch_size=16, ema_decay=0.9, log_every=2, checkpoint_every=3,
                  progress=False, workers=0)
    config.update(overrides)
    return Trainer(MLP(2, width=8, depth=1), ConditionalFlowMatcher(sigma=0.1), toy_sampler("gaussian"),
                   toy_sampler("moons"), TrainConfig(**config))


def cli_run(folder):
    """A genuine `ot-cfm train` checkpoint in ``folder``; returns its path."""
    assert main(["train", "--steps", "4", "--batch-size", "16", "--width", "8", "--depth", "1", "--eval-samples",
                 "50", "--ema-decay", "0.5", "--out", str(folder), "--no-progress"]) == 0
    return folder / CHECKPOINT_NAME


def test_genuine_checkpoint_holds_plain_data_only_and_loads_safely(tmp_path):
    run = trainer(tmp_path)
    run.fit()
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)  # torch's own safe loader accepts it
    read = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert set(CHECKPOINT_KEYS) <= set(read) and read["step"] == 6
    assert read["optimizer"]["state"] and read["ema"]["n_averaged"] == 6 and read["generator"].dtype == torch.uint8
    assert read["fingerprint"] == state["fingerprint"] == run._fingerprint()
    assert read["loss"] == run.last_loss and read["loss"] == read["loss"]  # the last logged loss, a number


def crafted_copy(genuine: Path, marker: Path) -> Path:
    state = torch.load(genuine, weights_only=True)
    state["note"] = WritesAFile(marker)  # one crafted extra entry: the rest of the checkpoint is genuine
    crafted = genuine.with_name("crafted.pt")
    torch.save(state, crafted)
    # the payload is live: the unsafe loader runs it
    torch.load(crafted, weights_only=False)
    assert marker.read_text() == "code ran"
    marker.unlink()
    return crafted


def test_crafted_checkpoint_is_refused_by_sample_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "written-by-checkpoint"
    crafted = crafted_copy(cli_run(tmp_path / "run"), marker)
    assert main(["sample", str(crafted), "--n", "10", "--solver", "euler", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert f"refused to load checkpoint {crafted}" in err and "exec" in err
    assert not marker.exists() and not (tmp_path / "s.pt").exists()


def test_crafted_checkpoint_is_refused_on_resume_and_runs_nothing(tmp_path):
    marker = tmp_path / "written-by-checkpoint"
    run = trainer(tmp_path / "run", steps=3)
    run.fit()
    crafted = crafted_copy(tmp_path / "run" / CHECKPOINT_NAME, marker)
    os.replace(crafted, tmp_path / "run" / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=f"refused to load checkpoint {tmp_path / 'run' / CHECKPOINT_NAME}"):
        trainer(tmp_path / "run").fit(resume=True)
    assert not marker.exists()


def foreign_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.txt", "not a checkpoint")


def corrupt_record(path):  # a whole archive whose pickled record is damaged
    data = bytearray(path.read_bytes())
    start = data.index(b"data.pkl") + 60
    data[start:start + 40] = bytes(range(200, 240))
    path.write_bytes(bytes(data))


DAMAGE = {
    "empty": (lambda p: p.write_bytes(b""), "is empty"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
    "garbage": (lambda p: p.write_bytes(b"\x80\x02garbage" * 50), "not a torch.save archive"),
    "plain pickle": (lambda p: p.write_bytes(pickle.dumps({"step": 1})), "not a torch.save archive"),
    "foreign zip": (foreign_zip, "is corrupt: RuntimeError: file in archive is not in a subdirectory"),
    "not a dict": (lambda p: torch.save([torch.ones(2)], p), "holds a list, not a dict"),
    "missing entries": (lambda p: torch.save({"step": 3, "model": {}}, p), "lacks"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_names_the_file_and_the_fault(tmp_path, damage, capsys):
    path = cli_run(tmp_path / "run")
    spoil, says = DAMAGE[damage]
    spoil(path)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    assert str(path) in str(caught.value) and says in str(caught.value)
    assert main(["sample", str(path), "--n", "10", "--solver", "euler", "--out", str(tmp_path / "s")]) == 2
    assert f"ot-cfm sample: error: {caught.value}" in capsys.readouterr().err


def test_record_damaged_inside_a_whole_archive_is_reported_as_corrupt(tmp_path):
    path = cli_run(tmp_path / "run")
    corrupt_record(path)
    # found by the record's CRC-32 before torch reads it (torch itself failed with a UnicodeDecodeError)
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt: its entry archive/data.pkl is damaged "
                                              r"\(Bad CRC-32"):
        read_checkpoint(path)


def test_damaged_checkpoint_on_resume_names_the_file(tmp_path):
    trainer(tmp_path, steps=3).fit()
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / CHECKPOINT_NAME} is empty"):
        trainer(tmp_path).fit(resume=True)


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "s")]) == 2
    assert f"checkpoint {tmp_path / 'nothing.pt'} does not exist" in capsys.readouterr().err


def test_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full, a device whose writes fail with ENOSPC")
    run = trainer(tmp_path, steps=3)
    run.fit()
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    leftover = tmp_path / "checkpoint.ptfullness.tmp"

    def full_disk_mkstemp(dir, prefix, suffix):  # the temporary file lands on a full device
        leftover.touch()
        return os.open("/dev/full", os.O_WRONLY), str(leftover)
    monkeypatch.setattr(atomic.tempfile, "mkstemp", full_disk_mkstemp)
    with pytest.raises(OSError, match=f"could not write {tmp_path / CHECKPOINT_NAME}: No space left on device") as caught:
        run.save_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert caught.value.errno == errno.ENOSPC
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before and not leftover.exists()


def test_failed_write_during_training_is_a_clear_cli_error(tmp_path, monkeypatch, capsys):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(atomic.os, "fsync", no_space)
    out = tmp_path / "run"
    assert main(["train", "--steps", "4", "--batch-size", "16", "--width", "8", "--eval-samples", "50",
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"could not write {out / CHECKPOINT_NAME}: No space left on device" in err
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_metadata_that_a_checkpoint_cannot_hold_is_refused_before_training(tmp_path):
    with pytest.raises(TypeError, match=r"metadata\['data'\] is a PosixPath|metadata\['data'\] is a WindowsPath"):
        Trainer(MLP(2, width=8, depth=1), ConditionalFlowMatcher(), toy_sampler("gaussian"), toy_sampler("moons"),
                TrainConfig(out_dir=str(tmp_path), steps=2, progress=False), metadata={"data": tmp_path})
