"""One live run per output folder; a killed run frees it; unwritable folders fail before the first step."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ot_cfm.cli import main
from ot_cfm.data import toy_sampler
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import CHECKPOINT_NAME, TrainConfig, Trainer
from ot_cfm.training.checkpoint import read_checkpoint
from ot_cfm.training.run_files import LOCK_NAME, RunFolderInUseError, claim_run_folder

HOLD = """
import sys, time
from ot_cfm.training.run_files import claim_run_folder
with claim_run_folder(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""
SMALL_CLI_RUN = ["--steps", "3", "--batch-size", "16", "--width", "8", "--depth", "1", "--eval-samples", "50",
                 "--no-progress"]


def make_trainer(folder, target=None, **overrides):
    torch.manual_seed(0)
    config = dict(out_dir=str(folder), steps=8, batch_size=16, log_every=2, checkpoint_every=4, progress=False,
                  workers=0)
    config.update(overrides)
    return Trainer(MLP(2, width=8, depth=1), ConditionalFlowMatcher(sigma=0.1), toy_sampler("gaussian"),
                   target or toy_sampler("moons"), TrainConfig(**config))


def test_second_live_run_into_the_folder_is_refused(tmp_path):
    """A second `ot-cfm train` started while a run trains into the same folder exits with an error and
    touches nothing of the first run, not even the temporary file of its checkpoint write."""
    folder, outcome = tmp_path / "run", {}

    def start_second_run(model, step):
        if step == 4:
            (folder / "checkpoint.ptinflight.tmp").write_bytes(b"the first run's write in progress")
            done = subprocess.run([sys.executable, "-m", "ot_cfm.cli", "train", "--out", str(folder), *SMALL_CLI_RUN],
                                  capture_output=True, text=True, timeout=300)
            outcome.update(code=done.returncode, err=done.stderr, temporary=(folder / "checkpoint.ptinflight.tmp").exists())
        return {}
    first = make_trainer(folder, eval_every=4)
    first.evaluate = start_second_run
    assert first.fit().step == 8
    assert outcome["code"] == 2, outcome["err"]
    assert f"output folder {folder} is in use by another live run" in outcome["err"]
    assert outcome["temporary"]
    state = read_checkpoint(folder / CHECKPOINT_NAME)
    assert state["step"] == 8 and state["metadata"] == {}  # the first run's checkpoint, not the CLI run's
    assert not (folder / "metrics.json").exists()


def test_folder_of_a_killed_run_is_free_again(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunFolderInUseError, match=f"output folder {folder} is in use"):
            make_trainer(folder).fit()
        assert not (folder / CHECKPOINT_NAME).exists()
    finally:
        holder.kill()
        holder.wait()
    assert (folder / LOCK_NAME).exists()  # the file stays behind; the lock died with its process
    assert make_trainer(folder).fit().step == 8


def test_claims_nest_in_one_thread_and_exclude_other_threads(tmp_path):
    refused = []

    def other_thread():
        try:
            with claim_run_folder(tmp_path):
                pass
        except RunFolderInUseError as err:
            refused.append(str(err))
    with claim_run_folder(tmp_path):
        with claim_run_folder(tmp_path):  # the command line holds the folder around Trainer.fit
            pass
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert len(refused) == 1 and str(tmp_path) in refused[0]
    with claim_run_folder(tmp_path):  # released by the outer block's end
        pass


def test_stale_temporary_files_are_removed_when_a_run_starts(tmp_path):
    stale = [tmp_path / "checkpoint.ptk2j4h5g6.tmp", tmp_path / "checkpoint.pt_a1b2c3d.tmp"]
    kept = [tmp_path / "checkpoint.pt.tmp", tmp_path / "notes.tmp", tmp_path / "checkpoint.ptbackup12.bak",
            tmp_path / "other.ptk2j4h5g6.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    make_trainer(tmp_path, steps=2).fit()
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_cli_removes_stale_metrics_temporaries(tmp_path):
    stale = tmp_path / "metrics.jsonq9w8e7r6.tmp"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("{")
    assert main(["train", "--out", str(tmp_path), *SMALL_CLI_RUN]) == 0
    assert not stale.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.fixture
def unwritable_folder(tmp_path):
    """An existing folder in which no file can be created, for this user."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
    elif Path("/proc").is_dir():  # root may write anywhere but in a pseudo file system
        yield Path("/proc")
    else:
        pytest.skip("no folder that this user cannot write to")


def test_unwritable_folder_fails_before_the_first_step(unwritable_folder):
    draws = []
    moons = toy_sampler("moons")

    def counting_target(n, generator=None):
        draws.append(n)
        return moons(n, generator)
    with pytest.raises(OSError, match=f"output folder {unwritable_folder} is not writable"):
        make_trainer(unwritable_folder, target=counting_target).fit()
    assert draws == []


def test_unwritable_folder_is_a_clear_cli_error(unwritable_folder, capsys):
    assert main(["train", "--out", str(unwritable_folder), *SMALL_CLI_RUN]) == 2
    assert f"output folder {unwritable_folder} is not writable" in capsys.readouterr().err
