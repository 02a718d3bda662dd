"""Toy training: ot-cfm's exact OT-CFM against torchcfm's, same model, data, seeds and steps.

Three training loops run interleaved in one process (their order rotates every step), for each
task and seed:

- ``torchcfm``: ``ExactOptimalTransportConditionalFlowMatcher`` in the loop of torchcfm's README
  (sample, ``sample_location_and_conditional_flow``, ``model(cat([x_t, t]))``, MSE, Adam step);
- ``ours``: ``ConditionalFlowMatcher(ExactOTCoupler())`` in the same plain loop;
- ``ours-trainer``: the same through ``Trainer.train_step``.

All three start from the same weights (``torchcfm.models.models.MLP(2, w=64, time_varying=True)``
and ``ot_cfm.models.MLP(2)`` are the same architecture) and see the same data batches, drawn with
ot-cfm's i.i.d. samplers from one seeded generator each. ``ours`` and ``ours-trainer`` also share
their t draws, so they end with identical weights (checked) and only the former is evaluated.
The coupling call is timed separately inside each step. After training, W2 (2000 vs 2000) at
Euler NFE 1, 2, 4, 8 and dopri5, and NPE, come from ``ot_cfm.evaluation.evaluate_samples``.

torchcfm's exact sampler draws its pairs with numpy's global RNG; it is seeded once per run.

A second timing runs whole blocks of steps in rotating order: torchcfm's loop against ``Trainer.fit``
with 0 and 2 worker processes (``TrainConfig(workers=...)``), which couple batches in the background
and so cannot be timed step by step next to the other loops.

    python -m benchmarks.toy_training --quick      # smoke run, from the repository root
    python -m benchmarks.toy_training              # full run, writes benchmarks/results/toy_training.md
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if not __package__:  # run as a file: put the repository root first, not this folder (its proximal.py)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from torch import nn

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.data import toy_sampler
from ot_cfm.evaluation import evaluate_samples
from ot_cfm.evaluation.metrics import wasserstein2
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import TrainConfig, Trainer
from ot_cfm.training.batches import CoupledBatches

TASKS = {"8gaussians-moons": ("8gaussians", "moons"), "gaussian-moons": ("gaussian", "moons")}
LABELS = ("euler-1", "euler-2", "euler-4", "euler-8", "dopri5")


class Stopwatch:
    """Replaces ``obj.name`` by a timed call; ``read()`` returns the seconds spent since the last read."""

    def __init__(self, obj, name: str):
        self.seconds = 0.0
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(obj, name, timed)

    def read(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class ConcatTimeField(nn.Module):
    """torchcfm's calling convention ``net(cat([x, t]))`` as a field ``v(t, x)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, t, x):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        return self.net(torch.cat([x, t], dim=-1))


@dataclass
class Variant:
    """One training loop: ``step()`` runs one step; step and coupling times are recorded per step."""

    name: str
    step: Callable[[], object]
    stopwatch: Stopwatch
    model: nn.Module
    field: nn.Module
    step_seconds: list = field(default_factory=list)
    coupling_seconds: list = field(default_factory=list)

    def timed_step(self) -> None:
        self.stopwatch.read()
        start = time.perf_counter()
        self.step()
        self.step_seconds.append(time.perf_counter() - start)
        self.coupling_seconds.append(self.stopwatch.read())


def iid_batches(source, target, seed: int, batch: int):
    """The Trainer's data stream before coupling: batch k drawn with ``batch_generator(seed, k)``."""
    raw = CoupledBatches(source, target, None, batch, seed)
    return (raw[k] for k in itertools.count())


def torchcfm_variant(source, target, seed: int, batch: int, lr: float) -> Variant:
    from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher
    from torchcfm.models.models import MLP as TorchcfmMLP

    np.random.seed(seed)  # torchcfm's plan sampling uses numpy's global RNG
    torch.manual_seed(seed)  # model initialisation
    model = TorchcfmMLP(dim=2, w=64, time_varying=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    data, times = iid_batches(source, target, seed, batch), torch.Generator().manual_seed(seed + 1)

    def step():
        optimizer.zero_grad()
        x0, x1 = next(data)
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1, t=torch.rand(batch, generator=times))
        vt = model(torch.cat([xt, t[:, None]], dim=-1))
        loss = torch.mean((vt - ut) ** 2)
        loss.backward()
        optimizer.step()

    return Variant("torchcfm", step, Stopwatch(fm.ot_sampler, "sample_plan"), model, ConcatTimeField(model))


def ours_variant(source, target, seed: int, batch: int, lr: float) -> Variant:
    torch.manual_seed(seed)  # model initialisation
    model = MLP(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    coupler = ExactOTCoupler()
    matcher = ConditionalFlowMatcher(coupler)
    data, times = iid_batches(source, target, seed, batch), torch.Generator().manual_seed(seed + 1)

    def step():
        optimizer.zero_grad()
        loss = matcher.loss(model, *next(data), generator=times)
        loss.backward()
        optimizer.step()

    return Variant("ours", step, Stopwatch(coupler, "pair"), model, model)


def trainer_variant(source, target, seed: int, batch: int, lr: float, steps: int) -> Variant:
    torch.manual_seed(seed)  # model initialisation
    model = MLP(2)
    coupler = ExactOTCoupler()
    config = TrainConfig(steps=steps, batch_size=batch, lr=lr, seed=seed, progress=False)
    trainer = Trainer(model, ConditionalFlowMatcher(coupler), source, target, config)
    return Variant("ours-trainer", trainer.train_step, Stopwatch(coupler, "pair"), model, model)


def block_step_ms(run_block: Callable[[Callable[[], None]], None], steps: int) -> float:
    """Steady-state ms per step of one block: ``run_block(tick)`` trains ``steps`` steps and calls ``tick()`` after
    each; the first tenth (worker start-up, warm-up) is left out."""
    stamps = []
    run_block(lambda: stamps.append(time.perf_counter()))
    skip = steps // 10
    return 1e3 * (stamps[-1] - stamps[skip]) / (len(stamps) - 1 - skip)


def workers_timing(task: str, seed: int, args) -> dict:
    """Wall time per step of torchcfm's loop and of ``Trainer.fit`` with 0 and ``args.workers`` worker processes,
    in blocks of ``args.block_steps`` steps whose order rotates each round (background workers would steal
    time from interleaved steps, so this timing runs whole blocks)."""
    source, target = (toy_sampler(name) for name in TASKS[task])
    batch, lr, steps = args.batch_size, args.lr, args.block_steps

    def torchcfm_block(tick):
        step = torchcfm_variant(source, target, seed, batch, lr).step
        for _ in range(steps):
            step()
            tick()

    def trainer_block(workers):
        def run(tick):
            torch.manual_seed(seed)
            config = TrainConfig(steps=steps, batch_size=batch, lr=lr, seed=seed, progress=False, workers=workers,
                                 threads=args.threads)
            trainer = Trainer(MLP(2), ConditionalFlowMatcher(ExactOTCoupler()), source, target, config)
            inner = trainer.train_step
            trainer.train_step = lambda b=None: (inner(b), tick())[0]
            trainer.fit()
        return run

    blocks = {"torchcfm": torchcfm_block, **{f"ours-trainer, {w} workers": trainer_block(w) for w in args.workers}}
    times = {name: [] for name in blocks}
    names = list(blocks)
    for r in range(args.blocks):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(block_step_ms(blocks[name], steps))
    return {name: {"step_ms": float(np.median(t)),
                   "ratio": float(np.median([a / b for a, b in zip(t, times["torchcfm"])]))}
            for name, t in times.items()}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def run_one(task: str, seed: int, args) -> dict:
    """Train the three variants interleaved, then evaluate torchcfm and ours on the same samples."""
    source, target = (toy_sampler(name) for name in TASKS[task])
    variants = [torchcfm_variant(source, target, seed, args.batch_size, args.lr),
                ours_variant(source, target, seed, args.batch_size, args.lr),
                trainer_variant(source, target, seed, args.batch_size, args.lr, args.steps)]
    everything, trainer_steps = list(variants), min(args.trainer_steps, args.steps)
    row = {"task": task, "seed": seed, "variants": {}}
    for k in range(args.steps + 1):
        if k == trainer_steps:  # the Trainer is timed on the first steps only, then checked against `ours`
            row["trainer_matches_plain_loop"] = same_weights(everything[1].model, everything[2].model)
            variants.pop()
        if k == args.steps:
            break
        shift = k % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            variant.timed_step()
    skip = min(20, trainer_steps // 10)  # first steps: allocator and solver warm-up
    for variant in everything:
        steps, coupling = np.array(variant.step_seconds[skip:]), np.array(variant.coupling_seconds[skip:])
        out = {"step_ms": 1e3 * float(np.median(steps)), "coupling_ms": 1e3 * float(np.median(coupling)),
               "coupling_share": float(np.median(coupling / steps)),
               "step_ms_trainer_window": 1e3 * float(np.median(variant.step_seconds[skip:trainer_steps]))}
        if variant.name != "ours-trainer":
            variant.field.eval()
            quality, tensors = evaluate_samples(variant.field, source, target, n=args.eval_samples,
                                                euler_nfes=(1, 2, 4, 8),
                                                generator=torch.Generator().manual_seed(seed + 10_000))
            out.update(w2=quality.w2, nfe=quality.nfe, npe=quality.npe, w2_floor=quality.w2_floor,
                       w2_source=wasserstein2(tensors["source"], tensors["target"]))
        row["variants"][variant.name] = out
    return row


def _mean_sd(values) -> str:
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def to_markdown(rows: list, timing: dict, args, command: str, seconds: float) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    names = ("torchcfm", "ours", "ours-trainer")
    lines = ["# Toy training: ot-cfm against torchcfm (exact OT-CFM)", "",
             f"Command: `{command}`  ",
             f"Date: {datetime.date.today().isoformat()}; wall time {seconds / 60:.1f} min; torch "
             f"{torch.__version__}, {torch.get_num_threads()} intra-op threads.  ",
             f"Setting: batch {args.batch_size}, {args.steps} Adam steps at lr {args.lr}, sigma 0, seeds "
             f"{args.seeds}; MLP width 64 (same initial weights for all loops); ot-cfm's i.i.d. samplers "
             f"for both libraries; W2 on {args.eval_samples} vs {args.eval_samples} samples. "
             "Values are mean ± sd over seeds; times are per-seed medians over steps, measured interleaved "
             f"(ratios are per seed, then averaged); `ours-trainer` is timed over the first "
             f"{min(args.trainer_steps, args.steps)} steps only.", "",
             "## Step time", "",
             "| task | loop | step (ms) | ratio to torchcfm | coupling (ms) | coupling share of step |",
             "| --- | --- | --- | --- | --- | --- |"]
    for task in tasks:
        rs = [r for r in rows if r["task"] == task]
        for name in names:
            v = [r["variants"][name] for r in rs]
            window = "step_ms_trainer_window" if name == "ours-trainer" else "step_ms"  # same steps as the reference
            ratio = [r["variants"][name]["step_ms"] / r["variants"]["torchcfm"][window] for r in rs]
            lines.append(f"| {task} | {name} | {_mean_sd(x['step_ms'] for x in v)} | {_mean_sd(ratio)} | "
                         f"{_mean_sd(x['coupling_ms'] for x in v)} | "
                         f"{_mean_sd(100 * x['coupling_share'] for x in v)} % |")
    lines += ["", "## Step time with batches coupled in worker processes", "",
              f"`Trainer.fit` with `TrainConfig(workers=...)` against torchcfm's loop: wall time per step over blocks of "
              f"{args.block_steps} steps (first tenth left out), {args.blocks} rounds in rotating order, seed "
              f"{args.seeds[0]}; step time is the median over blocks, the ratio the median over rounds of "
              "ours / torchcfm in the same round. The weights do not depend on the number of workers "
              "(`tests/ot_cfm/test_trainer.py`).", "",
              "| task | loop | step (ms) | ratio to torchcfm |", "| --- | --- | --- | --- |"]
    for task, by_loop in timing.items():
        for name, v in by_loop.items():
            lines.append(f"| {task} | {name} | {v['step_ms']:.3g} | {v['ratio']:.3g} |")
    same = all(r["trainer_matches_plain_loop"] for r in rows)
    lines += ["", f"`ours-trainer` had weights {'identical to' if same else 'DIFFERENT from'} `ours` after its "
              "timed steps in every run (same data, t draws and initial weights), so its sample quality is that "
              "of `ours`.",
              "", "## Sample quality", "",
              "| task | loop | " + " | ".join(f"W2 {k}" for k in LABELS) + " | dopri5 NFE | NPE |",
              "| --- | --- | " + " | ".join("---" for _ in LABELS) + " | --- | --- |"]
    for task in tasks:
        rs = [r for r in rows if r["task"] == task]
        for name in names[:2]:
            v = [r["variants"][name] for r in rs]
            cells = " | ".join(_mean_sd(x["w2"][k] for x in v) for k in LABELS)
            lines.append(f"| {task} | {name} | {cells} | {_mean_sd(x['nfe']['dopri5'] for x in v)} | "
                         f"{_mean_sd(x['npe'] for x in v)} |")
        ref = [r["variants"]["ours"] for r in rs]
        lines.append(f"| {task} | references | W2 between two target samples (floor): "
                     f"{_mean_sd(x['w2_floor'] for x in ref)}; source vs target (untrained): "
                     f"{_mean_sd(x['w2_source'] for x in ref)} | | | | | | |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, gaussian-moons, 100 steps, 400 samples")
    p.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--trainer-steps", type=int, default=200,
                   help="steps over which the Trainer loop is timed alongside the others")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--out", type=Path, default=None,
                   help="markdown report (default: benchmarks/results/toy_training.md, none with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: a width-64 MLP gains nothing from more, and shared cores punish them)")
    p.add_argument("--json", type=Path, default=None, help="also write the per-seed results as JSON")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="worker-process counts of the Trainer in the block timing")
    p.add_argument("--block-steps", type=int, default=300, help="steps per block of the worker-process timing")
    p.add_argument("--blocks", type=int, default=5, help="rounds of blocks in the worker-process timing")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.tasks, args.seeds, args.steps, args.eval_samples = ["gaussian-moons"], args.seeds[:1], 100, 400
        args.block_steps, args.blocks = 40, 1
    command = "python -m benchmarks.toy_training " + " ".join(sys.argv[1:] if argv is None else argv)
    start, rows = time.perf_counter(), []
    for task in args.tasks:
        for seed in args.seeds:
            rows.append(run_one(task, seed, args))
            v = rows[-1]["variants"]
            print(f"{task} seed {seed}: step ms torchcfm {v['torchcfm']['step_ms']:.2f}, ours {v['ours']['step_ms']:.2f}, "
                  f"trainer {v['ours-trainer']['step_ms']:.2f}; W2 dopri5 torchcfm {v['torchcfm']['w2']['dopri5']:.3f}, "
                  f"ours {v['ours']['w2']['dopri5']:.3f} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    timing = {}
    for task in args.tasks:
        timing[task] = workers_timing(task, args.seeds[0], args)
        print(f"{task} blocks: " + ", ".join(f"{name} {v['step_ms']:.2f} ms ({v['ratio']:.2f}x)"
                                            for name, v in timing[task].items()), flush=True)
    report = to_markdown(rows, timing, args, command, time.perf_counter() - start)
    out = args.out or (None if args.quick else Path(__file__).parent / "results" / "toy_training.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": rows, "worker_timing": timing}, indent=2) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
