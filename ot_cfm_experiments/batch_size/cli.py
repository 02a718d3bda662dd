"""The command line of the batch-size study: ``ot-cfm experiment batch-size`` and
``examples/batch_size_convergence.py``.

``main`` builds the cells from the options (the full study by default, small settings with ``--quick``),
cheapest first so that an interrupted run has the most cells, runs them through the cache, writes the outputs
and prints where they are.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ot_cfm_experiments.batch_size.cells import Cell, ExperimentConfig
from ot_cfm_experiments.batch_size.report import write_outputs
from ot_cfm_experiments.batch_size.run import run_experiment
from ot_cfm_experiments.batch_size.targets import TARGETS, TRAINABLE, make_target

__all__ = ["main", "build_parser"]

_FULL = dict(targets=list(TARGETS), batch_sizes=[2 ** k for k in range(13)], sinkhorn_batch_sizes=[],
             seeds=5, n_eval=4096, train_batch_sizes=[8, 64, 256, 1024], train_seeds=2, train_steps=200,
             train_targets=list(TRAINABLE), train_eval_n=1000, moons_points=1000, fit_seconds=90.0)
_QUICK = dict(targets=["gauss2", "grid"], batch_sizes=[2 ** k for k in range(7)], sinkhorn_batch_sizes=[],
              seeds=2, n_eval=256, train_batch_sizes=[8, 64], train_seeds=1, train_steps=20,
              train_targets=["gauss2"], train_eval_n=200, moons_points=200, fit_seconds=10.0)


def build_parser(prog: str = "ot-cfm experiment batch-size") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Convergence of minibatch OT-CFM to population OT-CFM as the batch size grows.")
    p.add_argument("--quick", action="store_true", help="small settings for tests (any option below overrides them)")
    p.add_argument("--targets", nargs="+", choices=TARGETS, help=f"targets (default: all; quick: {_QUICK['targets']})")
    p.add_argument("--batch-sizes", nargs="+", type=int, help="exact-coupler batch sizes (default 2^0 .. 2^12)")
    p.add_argument("--sinkhorn-batch-sizes", nargs="*", type=int,
                   help="Sinkhorn-coupler batch sizes, e.g. 8192 16384 beyond the exact range (default: none; "
                        "one B = 1024 solve at epsilon 0.01 took 70 s on a loaded 2-core machine)")
    p.add_argument("--epsilon", type=float, default=1e-2, help="Sinkhorn epsilon, relative to the mean cost")
    p.add_argument("--seeds", type=int, help="seeds per cell (default 5)")
    p.add_argument("--n-eval", type=int, help="points per cell: ceil(n_eval / B) batches of size B (default 4096)")
    p.add_argument("--max-batches", type=int, default=256,
                   help="most batches per cell: B < n_eval / max_batches uses max_batches * B points (default 256)")
    p.add_argument("--times", nargs="+", type=float, default=[0.1, 0.5, 0.9], help="times of the regression error")
    p.add_argument("--train", action="store_true", help="also train models for the trained subset")
    p.add_argument("--train-targets", nargs="+", choices=TARGETS, help=f"default {list(TRAINABLE)}")
    p.add_argument("--train-batch-sizes", nargs="+", type=int, help="default 8 64 256 1024")
    p.add_argument("--train-seeds", type=int, help="seeds per trained cell (default 2)")
    p.add_argument("--train-steps", type=int, help="training steps per model (default 200)")
    p.add_argument("--train-eval-n", type=int, help="points for field error and W2 (default 1000)")
    p.add_argument("--moons-points", type=int, help="support size of the moons target (default 1000)")
    p.add_argument("--fit-seconds", type=float, help="time limit of each potential fit (default 90)")
    p.add_argument("--slope-min-b", type=int, default=16, help="smallest B in the slope fits (default 16)")
    p.add_argument("--out", default="runs/batch_size", help="folder of the CSV, markdown and figures")
    p.add_argument("--cache", default="runs/batch_size_cache",
                   help="folder of cached cells and fitted potentials (default runs/batch_size_cache)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _cells(args) -> list[Cell]:
    """Every cell, cheapest first (estimated cost: solves x B^2), so an interrupted run has the most cells."""
    cells = [Cell(t, "population", 0, s) for t in args.targets for s in range(args.seeds)]
    cells += [Cell(t, "exact", b, s) for b in args.batch_sizes for t in args.targets for s in range(args.seeds)]
    cells += [Cell(t, "sinkhorn", b, s) for b in args.sinkhorn_batch_sizes for t in args.targets
              for s in range(args.seeds)]
    if args.train:
        cells += [Cell(t, "trained", b, s) for b in args.train_batch_sizes for t in args.train_targets
                  if t in args.targets for s in range(args.train_seeds)]

    def cost(cell: Cell) -> float:
        if cell.coupler == "trained":
            return args.train_steps * cell.batch_size ** 2
        size = cell.batch_size or args.n_eval
        return min(args.max_batches, math.ceil(args.n_eval / size)) * size ** 2

    return sorted(cells, key=cost)


def main(argv: Sequence[str] | None = None, *, on_cell: Callable[[Cell, dict], None] | None = None,
         prog: str = "ot-cfm experiment batch-size") -> int:
    """Run the experiment from command-line arguments; print a summary; return 0."""
    args = build_parser(prog).parse_args(argv)
    preset = _QUICK if args.quick else _FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    bad = [b for b in args.batch_sizes + args.sinkhorn_batch_sizes + args.train_batch_sizes if b < 1]
    if bad or args.seeds < 1 or args.n_eval < 1:
        raise SystemExit(f"batch sizes, --seeds and --n-eval must be positive (got batch sizes {bad})")
    config = ExperimentConfig(n_eval=args.n_eval, max_batches=args.max_batches, times=tuple(args.times), epsilon=args.epsilon,
                              train_steps=args.train_steps, train_eval_n=args.train_eval_n,
                              moons_points=args.moons_points, fit_seconds=args.fit_seconds)
    out = Path(args.out)
    cache = Path(args.cache)
    start = time.perf_counter()
    rows = run_experiment(_cells(args), config, cache, progress=not args.no_progress, on_cell=on_cell)
    seconds = time.perf_counter() - start
    targets = {t: make_target(t, cache_dir=cache, config=config) for t in args.targets}
    arguments = " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"# Batch-size convergence of minibatch OT-CFM\n\nArguments: `{arguments}`. "
              f"Source N(0, I_d); min({config.n_eval}, {config.max_batches} B) points per cell, in independent "
              f"batches of size B; "
              f"Sinkhorn epsilon {config.epsilon:g} relative to the mean cost. Cell compute time (sum over cached "
              f"cells, including interrupted runs): {sum(r['seconds'] for r in rows):.0f} s; "
              f"this invocation: {seconds:.0f} s.")
    paths = write_outputs(rows, targets, out, min_batch=args.slope_min_b, header=header)
    print(f"batch-size experiment: {len(rows)} cells in {seconds:.1f} s")
    for p in paths:
        print(f"  wrote {p}")
    return 0
