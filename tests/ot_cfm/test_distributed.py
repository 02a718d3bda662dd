"""Data-parallel training on the CPU (gloo): each test starts its ranks as processes with the environment torchrun
gives them, so the Trainer initialises the process group itself, as it does under torchrun."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_worker import BASIC_RUNS, make_trainer

from ot_cfm.cli import main
from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.data import toy_sampler
from ot_cfm.training import CHECKPOINT_NAME, METRICS_NAME, TrainConfig
from ot_cfm.training.batches import CoupledBatches
from ot_cfm.training.checkpoint import read_checkpoint, write_checkpoint
from ot_cfm.training.distributed import COUPLING_MODES, init_from_env, per_rank_batch

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_environment(rank: int, world: int, port: int, **extra: str) -> dict:
    """This process's environment with the variables torchrun gives rank ``rank`` of ``world`` (and ``extra``)."""
    return dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **extra)


def start_ranks(command: list[str], world: int = WORLD, **extra: str) -> list[subprocess.Popen]:
    """``world`` processes of ``command`` (python arguments), started as torchrun would start them."""
    port = free_port()
    return [subprocess.Popen([sys.executable, *command], env=torchrun_environment(rank, world, port, **extra),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(world)]


def launch(scenario: str, out: Path, options: dict | None = None, *, world: int = WORLD, expect_killed: bool = False,
           command: list[str] | None = None) -> list[str]:
    """Run ``world`` ranks of the worker script (or of ``command``) as torchrun would (its environment variables),
    wait for them; their outputs."""
    procs = start_ranks(command or [str(WORKER), scenario, str(out), json.dumps(options or {})], world)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        if expect_killed:
            assert p.returncode == -9, f"rank {rank} was to kill itself, ended with {p.returncode}:\n{text}"
        else:
            assert p.returncode == 0, f"rank {rank} failed ({p.returncode}):\n{text}"
    return outputs


def single_process_weights(options: dict, resume_from: Path | None = None, **fit):
    trainer = make_trainer(dict(options, out_dir=str(resume_from) if resume_from else None))
    trainer.fit(**fit)
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_per_rank_batch_and_config_refuse_what_does_not_split():
    assert per_rank_batch(256, 4) == 64
    with pytest.raises(ValueError, match="does not divide by the world size 3"):
        per_rank_batch(256, 3)
    with pytest.raises(ValueError, match="coupling_mode must be one of"):
        TrainConfig(coupling_mode="sharded")
    assert COUPLING_MODES == ("global", "local")


def test_init_from_env_is_single_process_without_torchrun_and_names_a_missing_variable(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert init_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT not set"):
        init_from_env()


BAD_ENVIRONMENTS = [  # (variables, what the error must say)
    (dict(WORLD_SIZE="abc"), "WORLD_SIZE='abc' is not an integer"),
    (dict(RANK="3", WORLD_SIZE="2"), "RANK=3 must be in 0 .. 1"),
    (dict(RANK="-1", WORLD_SIZE="2"), "RANK=-1 must be in 0 .. 1"),
    (dict(RANK="0", WORLD_SIZE="0"), "WORLD_SIZE=0 must be >= 1"),
    (dict(RANK="1", WORLD_SIZE="1"), "RANK=1 must be in 0 .. 0"),  # stale, though one process
    (dict(LOCAL_RANK="2", LOCAL_WORLD_SIZE="2"), "LOCAL_RANK=2 must be in 0 .. 1"),
    (dict(LOCAL_RANK="zero"), "LOCAL_RANK='zero' is not an integer"),
    (dict(MASTER_PORT="http"), "MASTER_PORT='http' is not an integer"),
    (dict(MASTER_PORT="70000"), "MASTER_PORT=70000 must be in 1 .. 65535"),
]


@pytest.mark.parametrize("variables, message", BAD_ENVIRONMENTS)
def test_init_from_env_refuses_inconsistent_torchrun_variables_before_any_wait(monkeypatch, variables, message):
    def no_wait(*args, **kwargs):
        raise AssertionError("init_from_env started a rendezvous")

    monkeypatch.setattr(dist, "rendezvous", no_wait)
    monkeypatch.setattr(dist, "init_process_group", no_wait)
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    # a complete set of torchrun variables, then the bad ones
    for name, value in dict(dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"),
                            **variables).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        init_from_env()
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # what it read, for those it did not name
        assert f"{name}=" in str(error.value)


def test_init_from_env_refuses_a_timeout_that_is_no_positive_number(monkeypatch):
    monkeypatch.setattr(dist, "rendezvous", lambda *args, **kwargs: pytest.fail("init_from_env started a rendezvous"))
    for name, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape("timeout=-1 must be a positive number of seconds")):
        init_from_env(timeout=-1)
    with pytest.raises(ValueError, match=re.escape("rendezvous_timeout=nan must be a positive number")):
        init_from_env(rendezvous_timeout=float("nan"))
    monkeypatch.setenv("OT_CFM_DIST_TIMEOUT", "ten")
    with pytest.raises(ValueError, match=re.escape("variable OT_CFM_DIST_TIMEOUT='ten' must be a positive number")):
        init_from_env()
    monkeypatch.setenv("OT_CFM_DIST_TIMEOUT", "600")
    monkeypatch.setenv("OT_CFM_DIST_RENDEZVOUS_TIMEOUT", "0")
    with pytest.raises(ValueError, match=re.escape("OT_CFM_DIST_RENDEZVOUS_TIMEOUT='0' must be a positive number")):
        init_from_env()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_single_command_with_stale_torchrun_variables_fails_naming_them_after_the_rendezvous_timeout(tmp_path, rank):
    # rank 0 waits for a rank 1 that never comes; rank 1 for a rank 0 that does not listen
    port = free_port()
    env = torchrun_environment(rank, 2, port, OT_CFM_DIST_RENDEZVOUS_TIMEOUT="2")
    del env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]
    done = subprocess.run([sys.executable, "-m", "ot_cfm.cli", "train", "--steps", "1", "--no-progress",
                           "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert (f"ot-cfm train: error: rank {rank} of 2 did not find the other processes (it waits at most 2 s, "
            f"OT_CFM_DIST_RENDEZVOUS_TIMEOUT); it read RANK={rank}, WORLD_SIZE=2, MASTER_ADDR=127.0.0.1, "
            f"MASTER_PORT={port}, LOCAL_RANK unset, LOCAL_WORLD_SIZE unset. Stale torchrun variables") in done.stderr


@pytest.mark.slow
def test_a_stopped_peer_fails_the_other_rank_with_a_timeout_after_the_configured_seconds(tmp_path):
    # rank 1 stops itself (SIGSTOP) as step 2 of 10 begins; rank 0 waits in that step's collectives
    procs = start_ranks([str(WORKER), "train", str(tmp_path), json.dumps(dict(steps=10, stop_at=2))],
                        OT_CFM_DIST_TIMEOUT="5")
    try:
        text = procs[0].communicate(timeout=120)[0]
        assert procs[1].poll() is None  # stopped, not ended
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, text
    assert "Timed out waiting 5000ms" in text, text  # the configured timeout, not torch's 30 minutes


@pytest.fixture(scope="module")
def basics(tmp_path_factory):
    """One start of two processes: the pairs of both modes, one step of each, and a 10-step run (BASIC_RUNS)."""
    out = tmp_path_factory.mktemp("basics")
    launch("basics", out)
    return out


def load_ranks(folder: Path) -> list[dict]:
    return [torch.load(folder / f"train_{r}.pt", weights_only=True) for r in range(WORLD)]


def test_global_pairs_are_one_process_pairs_and_local_pairs_are_each_shard_coupled_alone(basics):
    saved = [torch.load(basics / f"pairs_{r}.pt", weights_only=True) for r in range(WORLD)]
    single = CoupledBatches(toy_sampler("gaussian"), toy_sampler("moons"),
                            lambda x0, x1, generator: ExactOTCoupler().pair(x0, x1), 32, seed=5)
    raw = CoupledBatches(toy_sampler("gaussian"), toy_sampler("moons"), None, 32, seed=5)
    for step in range(3):
        x0, x1 = single[step]
        # global: the ranks' rows, concatenated, are exactly one process's pairs of the whole batch
        assert torch.equal(torch.cat([s["global"][step][0] for s in saved]), x0)
        assert torch.equal(torch.cat([s["global"][step][1] for s in saved]), x1)
        # local: rank r's pairs are the exact coupling of its rows of the drawn batch alone
        d0, d1 = raw[step]
        for rank, s in enumerate(saved):
            rows = slice(16 * rank, 16 * (rank + 1))
            l0, l1 = ExactOTCoupler().pair(d0[rows], d1[rows])
            assert torch.equal(s["local"][step][0], l0) and torch.equal(s["local"][step][1], l1)
        assert not torch.equal(torch.cat([s["local"][step][1] for s in saved]), x1)  # the modes differ
    # a failed solve reaches every rank as an error (none waits for a permutation that never comes)
    assert "ValueError: this coupler always fails" in saved[0]["error"]
    assert "rank 0 failed to couple step 0" in saved[1]["error"]


def test_first_update_of_global_mode_is_one_process_update(basics):
    options = BASIC_RUNS["global"]
    single = single_process_weights(options)
    initial = torch.cat([p.detach().flatten() for p in make_trainer(options).model.parameters()])
    ranks = load_ranks(basics / "global")
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # DDP keeps the ranks' weights equal
    assert (single - initial).abs().max() > 1e-3  # the step moved the weights
    # equal up to the order of the gradient sums (DDP averages the two ranks' means)
    torch.testing.assert_close(ranks[0]["weights"], single, rtol=0, atol=1e-6)
    local = load_ranks(basics / "local")[0]["weights"]
    assert (local - single).abs().max() > 1e-4  # local pairs are other pairs: a different update


def test_a_flow_and_score_model_trains_its_score_head_across_ranks_as_in_one_process(basics):
    # Schrodinger-bridge CFM: Sinkhorn pairs drawn with each step's generator, the loss's score term, and both
    # networks inside DDP's forward; two steps on two processes give one process's weights
    options = BASIC_RUNS["score"]
    two = load_ranks(basics / "score")[0]["weights"]
    trainer = make_trainer(options)
    score_before = torch.cat([p.detach().flatten() for p in trainer.model.score_net.parameters()])
    trainer.fit()
    one = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    score_after = torch.cat([p.detach().flatten() for p in trainer.model.score_net.parameters()])
    assert (score_after - score_before).abs().max() > 1e-3  # the score head trains
    torch.testing.assert_close(two, one, rtol=0, atol=1e-6)


def test_rank0_alone_writes_checkpoints_and_log_and_ten_steps_follow_one_process(basics):
    whole = basics / "whole"
    ranks = load_ranks(whole)
    assert ranks[0]["saved_at"] == [4, 8, 10] and ranks[1]["saved_at"] == []  # checkpoints from rank 0 only
    assert read_checkpoint(whole / CHECKPOINT_NAME)["world_size"] == WORLD
    logged = [json.loads(line)["step"] for line in (whole / METRICS_NAME).read_text().splitlines()]
    assert logged == list(range(1, 11))  # one log, written once per step
    assert [row["loss"] for row in ranks[0]["history"]] == [row["loss"] for row in ranks[1]["history"]]
    reference = single_process_weights(BASIC_RUNS["whole"])  # with one worker, in two processes; here inline, in one
    torch.testing.assert_close(ranks[0]["weights"], reference, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_killed_run_resumes_with_two_or_one_processes_to_the_uninterrupted_weights(basics, tmp_path):
    options, killed = dict(steps=10, checkpoint_every=4), tmp_path / "killed"
    uninterrupted = load_ranks(basics / "whole")[0]["weights"]
    launch("train", killed, dict(options, out_dir=str(killed), kill_at=6), expect_killed=True)
    assert read_checkpoint(killed / CHECKPOINT_NAME)["step"] == 4
    shutil.copytree(killed, tmp_path / "killed_copy")
    launch("train", killed, dict(options, out_dir=str(killed), resume=True))
    resumed = torch.load(killed / "train_0.pt", weights_only=True)["weights"]
    assert torch.equal(resumed, uninterrupted)  # same world size: the same operations, bitwise
    with pytest.warns(UserWarning, match="trained by 2 process.*with 1: the global batch stays 32"):
        one = single_process_weights(options, resume_from=tmp_path / "killed_copy", resume=True)
    # one process sums the gradient over 32 rows where two sum 16 each and average: equal up to rounding
    torch.testing.assert_close(one, uninterrupted, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_command_line_trains_on_two_processes_as_on_one(tmp_path):
    args = ["train", "--steps", "6", "--batch-size", "32", "--width", "16", "--depth", "2", "--eval-samples", "100",
            "--no-progress", "--workers", "0", "--threads", "1"]
    outputs = launch("", tmp_path, command=["-m", "ot_cfm.cli", *args, "--out", str(tmp_path / "two")])
    assert "| euler-1 |" in outputs[0] and "| euler-1 |" not in outputs[1]  # rank 0 alone evaluates
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == WORLD
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two, one = (read_checkpoint(tmp_path / name / CHECKPOINT_NAME)["model"] for name in ("two", "one"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)


def test_resuming_with_another_world_size_says_so_and_keeps_the_global_batch(tmp_path):
    options = dict(steps=4, checkpoint_every=2, out_dir=str(tmp_path))
    make_trainer(dict(options, steps=2)).fit()
    state = read_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert state["world_size"] == 1
    write_checkpoint(tmp_path / CHECKPOINT_NAME, dict(state, world_size=4))  # as a 4-process run would leave it
    with pytest.warns(UserWarning, match="trained by 4 process.*with 1: the global batch stays 32, 32 rows per process; "
                                         "the same pairs, t and eps"):
        make_trainer(options).fit(resume=True)
    local = make_trainer(dict(options, out_dir=str(tmp_path / "local"), coupling_mode="local", steps=2))
    local.fit()
    with pytest.raises(ValueError, match="config.coupling_mode: checkpoint 'local' vs now 'global'"):
        make_trainer(dict(options, out_dir=str(tmp_path / "local"))).fit(resume=True)
