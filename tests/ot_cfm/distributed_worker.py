"""One rank of a data-parallel test run, started by tests/ot_cfm/test_distributed.py with torchrun's
environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK, LOCAL_WORLD_SIZE).

    python distributed_worker.py SCENARIO OUT JSON_OPTIONS

Scenarios: "train" fits a Trainer (the options are TrainConfig fields, plus "resume", "kill_at": SIGKILL this
process when that step begins, and "stop_at": SIGSTOP rank 1 when that step begins) and saves this rank's final
weights and the steps at which it wrote checkpoints; "basics" (one start of the processes for several checks) saves
this rank's rows of steps 0..2 in both coupling modes and the error each rank gets when the owner's coupling of step
0 fails, then trains one step in each mode ("global", "local"), two steps of a flow-and-score model ("score") and
the run "whole" (10 steps, checkpoints every 4, one worker process), each in that subfolder of OUT.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.data import toy_sampler
from ot_cfm.matcher import ConditionalFlowMatcher, SchrodingerBridgeConditionalFlowMatcher
from ot_cfm.models import MLP, FlowAndScore
from ot_cfm.training import TrainConfig, Trainer
from ot_cfm.training.distributed import GlobalBatches, LocalShards, distributed_batch_stream, init_from_env


def make_trainer(options: dict, trainer_class=Trainer) -> Trainer:
    """The test run: the same model, samplers and matcher in every process and in the test itself. Option
    "score": True trains a flow-and-score model with Schrodinger-bridge CFM (Sinkhorn pairs drawn at random)."""
    torch.manual_seed(0)  # model initialisation
    config = dict(steps=4, batch_size=32, lr=1e-2, log_every=1, checkpoint_every=4, progress=False, workers=0,
                  threads=1)
    config.update(options)
    if config.pop("score", False):
        model = FlowAndScore(MLP(2, width=16, depth=2), MLP(2, width=16, depth=2))
        matcher = SchrodingerBridgeConditionalFlowMatcher(sigma=0.5)
    else:
        model, matcher = MLP(2, width=16, depth=2), ConditionalFlowMatcher(coupler=ExactOTCoupler(), sigma=0.1)
    return trainer_class(model, matcher, toy_sampler("gaussian"), toy_sampler("moons"), TrainConfig(**config))


def pairs(out: Path, rank: int) -> None:
    context = init_from_env()
    matcher = ConditionalFlowMatcher(coupler=ExactOTCoupler())
    source, target = toy_sampler("gaussian"), toy_sampler("moons")
    saved = {}
    for mode, data in (("global", GlobalBatches(source, target, matcher.coupler, 32, 5, rank, context.world_size)),
                       ("local", LocalShards(source, target, matcher.couple, 32, 5, rank, context.world_size))):
        saved[mode] = list(distributed_batch_stream(data, range(3), context, workers=1 if mode == "global" else 0))
    try:
        next(distributed_batch_stream(GlobalBatches(source, target, _Failing(), 32, 5, rank, context.world_size),
                                      range(1), context))
        saved["error"] = ""
    except RuntimeError as err:
        saved["error"] = str(err)
    torch.save(saved, out / f"pairs_{rank}.pt")


class _Failing(ExactOTCoupler):
    def indices(self, x0, x1, *, generator=None):
        raise ValueError("this coupler always fails")


class _Recording(Trainer):
    """Records the steps at which this process writes a checkpoint; SIGKILLs itself at step ``kill_at`` and, on rank
    1, SIGSTOPs itself at step ``stop_at`` (it stays stopped until killed)."""

    kill_at = stop_at = None
    saved_at: list = []

    def save_checkpoint(self, path):
        self.saved_at.append(self.step)
        super().save_checkpoint(path)

    def train_step(self, batch=None):
        if self.step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step == self.stop_at and self.distributed.rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        return super().train_step(batch)


def train(out: Path, rank: int, options: dict) -> None:
    options = dict(options)
    resume, _Recording.kill_at = options.pop("resume", False), options.pop("kill_at", None)
    _Recording.stop_at = options.pop("stop_at", None)
    _Recording.saved_at = []
    trainer = make_trainer(options, _Recording)
    result = trainer.fit(resume=resume)
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    out.mkdir(exist_ok=True)
    torch.save({"weights": weights, "saved_at": trainer.saved_at, "world_size": result.world_size,
                "history": result.history}, out / f"train_{rank}.pt")


#: the runs of the "basics" scenario: subfolder -> options
BASIC_RUNS = {"global": dict(steps=1, coupling_mode="global"), "local": dict(steps=1, coupling_mode="local"),
              "score": dict(steps=2, score=True),
              "whole": dict(steps=10, checkpoint_every=4, workers=1)}


if __name__ == "__main__":
    scenario, folder, opts = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    rank = int(os.environ["RANK"])
    if scenario == "basics":
        pairs(folder, rank)
        for name, run in BASIC_RUNS.items():
            train(folder / name, rank, dict(run, out_dir=str(folder / name)) if name == "whole" else run)
    else:
        train(folder, rank, opts)
