"""Scale: how much of the exact coupling stays on the training step's critical path, in one process and in
data-parallel runs of 1 and 2 processes (``torch.distributed``, gloo on the CPU).

1. One process, toy MLP (width 64), batch 256, 8gaussians -> moons: ``Trainer.fit`` step time with the exact
   coupler against the independent coupler, inline (0 workers) and with 1 and 2 worker processes. Blocks of
   steps in rotating order, several rounds; medians over rounds of the per-block ms per step, ratios taken
   within a round. "visible" is (exact - independent) / (one exact solve): the share of the solve the step
   still waits for.
2. Data-parallel: W = 1 and 2 processes started as torchrun starts them (its environment variables), at the
   same per-process batch b (global batch b W): throughput, and the coupling time each process spends per
   step in ``coupling_mode`` "global" (the global problem of every W-th step) and "local" (its own b rows
   every step), measured with 0 workers by a timing wrapper around the coupler, against one solve of the
   global batch b W timed alone. Solve times are CPU time of the solving thread (``time.thread_time``: on a
   machine shared with other work, wall times of a solve swing with the load); step times are wall time.

    python -m benchmarks.scale --quick     # smoke run, from the repository root
    python -m benchmarks.scale             # writes benchmarks/results/scale.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file: put the repository root first, not this folder (its proximal.py)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from ot_cfm.couplers.base import Coupler
from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.independent import IndependentCoupler
from ot_cfm.data import toy_sampler
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import TrainConfig, Trainer
from ot_cfm.training.batches import batch_generator
from ot_cfm.utils.parallelism import available_cores

SOURCE, TARGET = "8gaussians", "moons"


class TimedCoupler(Coupler):
    """``base`` with the CPU seconds of its ``indices`` calls in this process (``time.thread_time`` of the calling
    thread: foreign load and a training step sharing the core do not count) summed in ``seconds``."""

    def __init__(self, base: Coupler):
        self.base, self.seconds, self.calls = base, 0.0, 0
        self.solves_on_cpu, self.requires_equal_sizes = base.solves_on_cpu, base.requires_equal_sizes

    def __repr__(self) -> str:
        return f"TimedCoupler({self.base!r})"

    def indices(self, x0, x1, *, generator=None):
        start = time.thread_time()
        try:
            return self.base.indices(x0, x1, generator=generator)
        finally:
            self.seconds += time.thread_time() - start
            self.calls += 1

    def plan(self, x0, x1):
        return self.base.plan(x0, x1)


def make_coupler(name: str) -> Coupler:
    return TimedCoupler(ExactOTCoupler() if name == "exact" else IndependentCoupler())


def block(coupler: str, batch: int, steps: int, workers: int, mode: str = "global", seed: int = 0) -> dict:
    """Train ``steps`` steps; ms per step after the first tenth (start-up), and the coupling seconds per step
    spent in this process (0 workers only: workers solve in their own processes)."""
    torch.manual_seed(seed)
    wrapped = make_coupler(coupler)
    config = TrainConfig(steps=steps, batch_size=batch, seed=seed, progress=False, workers=workers, threads=1,
                         coupling_mode=mode, log_every=steps)
    trainer = Trainer(MLP(2), ConditionalFlowMatcher(wrapped), toy_sampler(SOURCE), toy_sampler(TARGET), config)
    stamps, inner = [], trainer.train_step
    trainer.train_step = lambda b=None: (inner(b), stamps.append(time.perf_counter()))[0]
    trainer.fit()
    skip = steps // 10
    return {"step_ms": 1e3 * (stamps[-1] - stamps[skip]) / (len(stamps) - 1 - skip),
            "solve_ms_per_step": 1e3 * wrapped.seconds / steps if workers == 0 else None}


def solve_ms(batch: int, repeats: int) -> float:
    """Median CPU ms (``time.thread_time``, as ``TimedCoupler``) of one exact solve of a toy batch of ``batch``
    points (fresh batches, seeded); timed among the training blocks (``rounds``)."""
    coupler, times = ExactOTCoupler(), []
    for k in range(repeats):
        g = batch_generator(123, k)
        x0, x1 = toy_sampler(SOURCE)(batch, g), toy_sampler(TARGET)(batch, g)
        start = time.thread_time()
        coupler.indices(x0, x1)
        times.append(1e3 * (time.thread_time() - start))
    return statistics.median(times)


def rounds(configs: dict, n_rounds: int) -> dict:
    """Each config's block, ``n_rounds`` times in rotating order: {name: [result per round]}."""
    names, results = list(configs), {name: [] for name in configs}
    for r in range(n_rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(configs[name]())
    return results


def median_of(results: list, key: str) -> float | None:
    values = [r[key] for r in results if r[key] is not None]
    return statistics.median(values) if values else None


def ratio(a: list, b: list) -> float:
    """Median over rounds of a's step time over b's in the same round."""
    return statistics.median(x["step_ms"] / y["step_ms"] for x, y in zip(a, b))


def single_process(args) -> list[dict]:
    configs = {(c, w): (lambda c=c, w=w: block(c, args.batch, args.steps, w)) for w in args.workers
               for c in ("exact", "independent")}
    configs["solve"] = lambda: {"solve_ms": solve_ms(args.batch, args.solve_repeats)}
    results = rounds(configs, args.rounds)
    one_solve = statistics.median(r["solve_ms"] for r in results.pop("solve"))
    rows = []
    inline_exact, inline_indep = results[("exact", args.workers[0])], results[("independent", args.workers[0])]
    for w in args.workers:
        exact, indep = results[("exact", w)], results[("independent", w)]
        rows.append({"workers": w, "exact_ms": median_of(exact, "step_ms"), "independent_ms": median_of(indep, "step_ms"),
                     "ratio_same_workers": ratio(exact, indep),
                     "ratio_to_inline_independent": ratio(exact, results[("independent", args.workers[0])]),
                     "solve_ms": one_solve,
                     "visible": statistics.median((e["step_ms"] - i["step_ms"]) / (e0["step_ms"] - i0["step_ms"])
                                                  for e, i, e0, i0 in zip(exact, indep, inline_exact, inline_indep))})
    return rows


def rank_main(spec: dict) -> None:
    """One process of a data-parallel measurement (started by ``distributed``)."""
    torch.set_num_threads(1)
    world, b = int(os.environ.get("WORLD_SIZE", "1")), spec["per_rank_batch"]
    modes = ("global", "local") if world > 1 else ("global",)
    configs = {(c, m, w): (lambda c=c, m=m, w=w: block(c, b * world, spec["steps"], w, m))
               for w in spec["workers"] for m in modes for c in ("exact", "independent")
               if not (c == "independent" and m == "local")}
    # one solve of the global batch, timed in every process at once (the load of a data-parallel run)
    configs[("solve", "-", 0)] = lambda: {"solve_ms": solve_ms(b * spec["max_world"], spec["solve_repeats"])}
    results = rounds(configs, spec["rounds"])
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["out"]).write_text(json.dumps({"world": world, "results": [[list(k), v] for k, v in results.items()]}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed(args) -> dict:
    """{world: {(coupler, mode, workers): [results per round]}} from W-process runs launched like torchrun."""
    out = {}
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as folder:
            spec = dict(per_rank_batch=args.per_rank_batch, steps=args.dist_steps, rounds=args.rounds,
                        workers=args.dist_workers, out=str(Path(folder) / "rank0.json"), max_world=max(args.worlds),
                        solve_repeats=args.solve_repeats)
            port, procs = free_port(), []
            for rank in range(world):
                env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                           LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS="1")
                procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.scale", "--rank-run", json.dumps(spec)],
                                              env=env, cwd=Path(__file__).resolve().parents[1]))
            if any(p.wait() for p in procs):
                raise RuntimeError(f"a process of the {world}-process run failed")
            data = json.loads(Path(spec["out"]).read_text())
        out[world] = {tuple(k): v for k, v in data["results"]}
        print(f"world {world} done", flush=True)
    return out


def fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def to_markdown(single: list, dist_results: dict, args, command: str, seconds: float, load: tuple) -> str:
    lines = [
        "# Scale: exact coupling off the critical path, one process and data-parallel",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today()}; wall time {seconds / 60:.1f} min; torch {torch.__version__}, 1 torch thread per "
        f"process, {available_cores()} cores shared with other work: load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end (1-minute averages; timings move with the load, compare ratios).",
        "",
        f"## One process: exact OT-CFM against independent coupling (batch {args.batch})",
        "",
        f"`Trainer.fit`, MLP width 64, {SOURCE} -> {TARGET}; {args.steps}-step blocks (first tenth left out), "
        f"{args.rounds} rounds in rotating order; medians over rounds. `visible` = (exact - independent) with these "
        "workers / (exact - independent) inline, within a round, median over rounds: the share of the inline "
        "coupling cost the step still pays. One solve: CPU time of the solving thread, median of "
        f"{args.solve_repeats} (a wall time would swing with the load).",
        "",
        "| workers | exact (ms/step) | independent (ms/step) | exact / independent, same workers | "
        "exact / independent inline | one solve (ms) | visible |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in single:
        lines.append(f"| {r['workers']} | {fmt(r['exact_ms'])} | {fmt(r['independent_ms'])} | "
                     f"{fmt(r['ratio_same_workers'])} | {fmt(r['ratio_to_inline_independent'])} | {fmt(r['solve_ms'])} | "
                     f"{r['visible']:.0%} |")
    b = args.per_rank_batch
    solves = {w: statistics.median(r["solve_ms"] for r in results[("solve", "-", 0)])
              for w, results in dist_results.items()}
    lines += [
        "",
        f"## Data-parallel, {b} rows per process (global batch {b} x W)",
        "",
        f"W processes started as torchrun starts them (gloo), {args.dist_steps}-step blocks, {args.rounds} rounds; "
        "rank 0's step time. With 0 workers, global mode solves ahead in the Trainer's prefetch thread, local mode "
        "inline. Solve per step: the exact coupling CPU time one process spends per step (0 workers, "
        f"measured by a timing wrapper around the coupler), against the CPU time of one solve of the largest global batch "
        f"(B = {b * max(args.worlds)}) timed alone among the blocks, in each of the W processes at once (median "
        f"of {args.solve_repeats} per round, then over rounds): "
        + ", ".join(f"W = {w}: {fmt(solves[w])} ms" for w in solves) + ".",
        "",
        "| W | global batch | coupler | mode | workers | ms/step | samples/s | exact / independent, same W and workers | "
        f"solve per step and process (ms) | solve / one solve of B = {b * max(args.worlds)}, same run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for world, results in dist_results.items():
        for (coupler, mode, workers), res in results.items():
            if coupler == "solve":
                continue
            step = median_of(res, "step_ms")
            solve = median_of(res, "solve_ms_per_step") if coupler == "exact" else None
            versus = ratio(res, results[("independent", "global", workers)]) if coupler == "exact" else None
            lines.append(f"| {world} | {b * world} | {coupler} | {mode if world > 1 else '-'} | {workers} | {fmt(step)} | "
                         f"{b * world / step * 1e3:.0f} | {fmt(versus)} | {fmt(solve)} | "
                         f"{fmt(solve / solves[world]) if solve is not None else '-'} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: short blocks, one round")
    p.add_argument("--batch", type=int, default=256, help="batch of the one-process comparison")
    p.add_argument("--steps", type=int, default=200, help="steps per block, one process")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker counts, one process (first: inline)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--solve-repeats", type=int, default=50)
    p.add_argument("--per-rank-batch", type=int, default=128)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dist-steps", type=int, default=120, help="steps per block, data-parallel")
    p.add_argument("--dist-workers", type=int, nargs="+", default=[0, 1], help="worker counts per process")
    p.add_argument("--out", type=Path, default=None, help="markdown file (default: benchmarks/results/scale.md)")
    p.add_argument("--rank-run", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.rank_run is not None:
        rank_main(json.loads(args.rank_run))
        return 0
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.dist_steps, args.rounds, args.solve_repeats = 30, 20, 1, 5
    command = " ".join(["python -m benchmarks.scale", *(sys.argv[1:] if argv is None else argv)])
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    single = single_process(args)
    print(single, flush=True)
    dist_results = distributed(args)
    report = to_markdown(single, dist_results, args, command, time.perf_counter() - start,
                         (load_start, os.getloadavg()[0]))
    out = args.out or (None if args.quick else Path(__file__).parent / "results" / "scale.md")
    if out is not None:
        out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
