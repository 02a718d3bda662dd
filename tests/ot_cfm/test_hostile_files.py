"""Files an attacker or a failing disk prepares: links planted at the names the package writes, a full disk
while sampling, a flipped bit in a checkpoint or a cached classifier, a checkpoint that would run a command.

A link planted at an output's name is replaced by the package's own file (the rename of the atomic write
replaces the link itself, without a check that could race with it); its target is never opened for writing.
"""

import errno
import io
import json
import os
import warnings
import zipfile

import pytest
import torch

from ot_cfm.cli import main
from ot_cfm.data import toy_sampler
from ot_cfm.images import classifier as classifier_module
from ot_cfm.images.classifier import ClassifierConfig, classifier_cache_path, load_or_train_classifier
from ot_cfm.images.datasets import load_image_dataset
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import CHECKPOINT_NAME, METRICS_NAME, TrainConfig, Trainer
from ot_cfm.training.checkpoint import CheckpointError, read_checkpoint
from ot_cfm.training.run_files import MetricsLog
from ot_cfm.utils import atomic

TRAIN = ["train", "--steps", "4", "--batch-size", "16", "--width", "8", "--depth", "1", "--eval-samples", "50",
         "--ema-decay", "0.5", "--no-progress"]
VICTIM = b'{"step": 0, "secret": "another user\'s file"}\n'  # a log row: nothing of it may enter the run's log


def trainer(folder, steps):
    torch.manual_seed(0)
    config = TrainConfig(out_dir=str(folder), steps=steps, batch_size=16, log_every=2, checkpoint_every=3,
                         progress=False, workers=0)
    return Trainer(MLP(2, width=8, depth=1), ConditionalFlowMatcher(sigma=0.1), toy_sampler("gaussian"),
                   toy_sampler("moons"), config)


def trained(folder):
    assert main([*TRAIN, "--out", str(folder)]) == 0
    return folder / CHECKPOINT_NAME


def sample(checkpoint, out, n=10, *options):
    return main(["sample", str(checkpoint), "--n", str(n), "--solver", "euler", "--steps", "2", "--out", str(out),
                 *options])


def plant_links(folder, names, victims, target_exists):
    """A link at each of ``names`` in ``folder`` to a file of ``victims`` (created when ``target_exists``)."""
    folder.mkdir(parents=True, exist_ok=True)
    victims.mkdir(exist_ok=True)
    targets = {}
    for name in names:
        target = victims / f"{name}.victim"
        if target_exists:
            target.write_bytes(VICTIM)
        (folder / name).symlink_to(target)
        targets[name] = target
    return targets


def assert_untouched(targets, target_exists):
    for target in targets.values():
        if target_exists:
            assert target.read_bytes() == VICTIM
        else:
            assert not os.path.lexists(target), f"{target} was created through the link"


@pytest.mark.parametrize("target_exists", [True, False], ids=["to a file", "dangling"])
def test_train_replaces_links_planted_in_the_run_folder_and_leaves_their_targets(tmp_path, target_exists):
    out = tmp_path / "run"
    targets = plant_links(out, [METRICS_NAME, "metrics.json", "samples.png"], tmp_path / "victims", target_exists)
    trained(out)
    assert_untouched(targets, target_exists)
    for name in targets:
        assert not (out / name).is_symlink() and (out / name).is_file()
    log = (out / METRICS_NAME).read_text()
    assert [json.loads(row)["step"] for row in log.splitlines()] == [4] and "secret" not in log
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("target_exists", [True, False], ids=["to a file", "dangling"])
def test_sample_replaces_links_planted_at_its_outputs_and_leaves_their_targets(tmp_path, target_exists):
    checkpoint = trained(tmp_path / "run")
    out = tmp_path / "shared"
    targets = plant_links(out, ["s.pt", "s.png"], tmp_path / "victims", target_exists)
    assert sample(checkpoint, out / "s") == 2  # samples (or links) already there: refused without --overwrite
    assert_untouched(targets, target_exists)
    assert sample(checkpoint, out / "s", 10, "--overwrite") == 0
    assert_untouched(targets, target_exists)
    assert not (out / "s.pt").is_symlink() and not (out / "s.png").is_symlink()
    assert torch.load(out / "s.pt", weights_only=True)["x1"].shape == (10, 2)
    assert (out / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_log_refuses_a_link_put_in_its_place_during_a_run(tmp_path):
    log = MetricsLog(tmp_path)
    log.truncate(0)
    log.append({"step": 1, "loss": 0.5})
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    (tmp_path / "link").symlink_to(victim)
    os.replace(tmp_path / "link", log.path)  # the log's name is now a link to another file
    with pytest.raises(OSError, match=f"could not write {log.path}: it is a symbolic link; refusing to write through"):
        log.append({"step": 2, "loss": 0.25})
    assert victim.read_bytes() == VICTIM


class DiskFillsUp:
    """A file whose disk is full after ``room`` bytes: the write stores what fits, then fails with ENOSPC."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        data = bytes(data)
        self.file.write(data[:self.room])
        self.file.flush()
        if len(data) > self.room:
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return len(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_sample_on_a_full_disk_keeps_the_previous_output_and_names_the_file(tmp_path, monkeypatch, capsys):
    checkpoint = trained(tmp_path / "run")
    out = tmp_path / "samples"
    assert sample(checkpoint, out / "s") == 0
    before = {name: (out / name).read_bytes() for name in ("s.pt", "s.png")}
    real_fdopen = atomic.os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: DiskFillsUp(real_fdopen(fd, mode), room=300))
    capsys.readouterr()
    assert sample(checkpoint, out / "s", 20, "--overwrite") == 2
    assert f"could not write {out / 's.pt'}: No space left on device" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(out)) == ["s.png", "s.pt"]  # no temporary file left behind


def entry_data_offset(data: bytes, info: zipfile.ZipInfo) -> int:
    """Where the bytes of ``info`` start: after its local header (30 bytes, then its name and extra field)."""
    name_length = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_length = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    return info.header_offset + 30 + name_length + extra_length


def flip_a_byte_of_the_largest_tensor(path) -> str:
    """Flip one bit in the middle of the largest tensor's bytes in the archive ``path``; returns that entry's name."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data[entry_data_offset(data, info) + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return info.filename


def test_flipped_byte_in_tensor_data_is_refused_with_the_file_named(tmp_path, capsys):
    path = trained(tmp_path / "run")
    entry = flip_a_byte_of_the_largest_tensor(path)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() == entry  # the damage is one the zip's CRC-32 shows
    torch.load(path, weights_only=True)  # and torch loads it regardless
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt: its entry {entry} is damaged "
                                              r"\(Bad CRC-32"):
        read_checkpoint(path)
    assert sample(path, tmp_path / "s") == 2
    assert f"checkpoint {path} is corrupt: its entry {entry} is damaged" in capsys.readouterr().err
    assert not (tmp_path / "s.pt").exists()


def rebuilt(path, change):
    """The archive ``path`` written again entry by entry with ``change(name, bytes)`` applied: fresh CRC-32s."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries:
            data = change(name, data)
            if data is not None:
                archive.writestr(name, data)


def test_damage_with_consistent_crcs_is_refused_by_the_recorded_digest(tmp_path):
    path = trained(tmp_path / "run")
    state = read_checkpoint(path)
    largest = max((k for k in state["model"]), key=lambda k: state["model"][k].numel())
    target = state["model"][largest].numpy().tobytes()

    def damage(name, data):  # a value changed in the model's largest tensor, its CRC-32 recomputed
        return data[:4] + bytes([data[4] ^ 0x01]) + data[5:] if data == target else data
    rebuilt(path, damage)
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt: its entries do not match the SHA-256"):
        read_checkpoint(path)


def test_checkpoints_written_before_the_digest_still_load_and_resume(tmp_path):
    whole = trainer(tmp_path / "whole", steps=6)
    whole.fit()
    trainer(tmp_path / "cut", steps=3).fit()
    path = tmp_path / "cut" / CHECKPOINT_NAME
    with zipfile.ZipFile(path) as archive:
        assert f"archive/.data/{atomic.DIGEST_NAME}" in archive.namelist()
    torch.save(read_checkpoint(path), path)  # what write_checkpoint wrote before the digest: torch.save alone
    with zipfile.ZipFile(path) as archive:
        assert not [name for name in archive.namelist() if atomic.DIGEST_NAME in name]
    resumed = trainer(tmp_path / "cut", steps=6)
    resumed.fit(resume=True)
    assert resumed.step == 6
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in whole.model.state_dict().items())


class RunsACommand:
    """Unpickling this calls os.system: the payload of a crafted checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_that_would_run_a_command_is_refused_unexecuted_with_a_plain_message(tmp_path, capsys):
    genuine = trained(tmp_path / "run")
    marker = tmp_path / "command-ran"
    state = torch.load(genuine, weights_only=True)
    state["note"] = RunsACommand(marker)
    crafted = tmp_path / "crafted.pt"
    torch.save(state, crafted)
    torch.load(crafted, weights_only=False)  # the payload is live
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(crafted)
    message = str(caught.value)
    assert message.startswith(f"refused to load checkpoint {crafted}: it holds something other than tensors and "
                              "plain values (a reference to ")
    assert "system" in message and "refused unexecuted" in message
    assert "weights_only" not in message and "corrupt" not in message
    assert sample(crafted, tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert message in err and "weights_only" not in err
    assert not marker.exists() and not (tmp_path / "s.pt").exists()


def test_classifier_cache_with_a_flipped_byte_is_retrained(tmp_path, monkeypatch):
    digits = load_image_dataset("digits")
    images, labels = digits.train_images[:200], digits.train_labels[:200]
    config = ClassifierConfig(steps=10)
    calls = []
    real_train = classifier_module.train_classifier
    monkeypatch.setattr(classifier_module, "train_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    first = load_or_train_classifier(images, labels, num_classes=10, config=config, cache_dir=tmp_path)
    path = classifier_cache_path(images, labels, num_classes=10, config=config, cache_dir=tmp_path)
    entry = flip_a_byte_of_the_largest_tensor(path)
    with pytest.warns(RuntimeWarning, match=f"cached classifier {path} is unreadable or does not match .*{entry} "
                                            "is damaged.*retraining"):
        second = load_or_train_classifier(images, labels, num_classes=10, config=config, cache_dir=tmp_path)
    assert calls == [1, 1]
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file loads silently
        load_or_train_classifier(images, labels, num_classes=10, config=config, cache_dir=tmp_path)
    assert calls == [1, 1]


def test_save_torch_records_a_digest_that_torch_load_ignores(tmp_path):
    atomic.save_torch(tmp_path / "x.pt", {"a": torch.arange(5.0)})
    data = (tmp_path / "x.pt").read_bytes()
    assert atomic.torch_archive_problem(data) is None
    assert torch.equal(torch.load(io.BytesIO(data), weights_only=True)["a"], torch.arange(5.0))
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True, mmap=True)["a"], torch.arange(5.0))
