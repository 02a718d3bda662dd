"""Why the exact coupler is no faster than torchcfm at d = 2: what warm-starting scipy's solver buys.

scipy's ``linear_sum_assignment`` (shortest augmenting paths) is invariant to adding constants to
rows but not to columns: solving ``C - v[None, :]`` returns the same permutation for every ``v``,
and with the optimal column duals ``v`` the augmenting paths become trivial. This script measures,
on the couplers benchmark's batches and the same cost ``C = -<x0_i, x1_j>`` (float64):

- ``pot``: POT's network simplex on the squared distances (what ``auto`` uses at d = 2);
- ``lsa``: scipy on ``C``;
- ``lsa | exact duals``: scipy on ``C - v`` with POT's optimal duals (the ceiling; the duals are
  not counted, they cost a full POT solve);
- ``half-batch duals``: the cheapest dual estimate that kept the permutation exact in our trials:
  POT with duals on the first half of each batch, its row duals ``u`` extended to every column by
  the c-transform ``v_j = min_i (C_ij - u_i)``, then scipy on ``C - v`` (all of it timed);
- ``multiscale``: what ``ExactOTCoupler`` does instead (``ot_cfm.couplers.multiscale``: shortest augmenting
  paths warm-started from pair-averaged k-d levels; results before it replaced POT on sparse candidate arcs
  in ``benchmarks/results/assignment_warm_start.md`` are for the earlier POT-based version).

Every variant returns the optimal permutation (checked against POT). Medians over ``--reps``.
A second table shows how accurate the duals must be: scipy on ``C - (v + noise)``, the noise
Gaussian with a standard deviation given as a fraction of the cost's standard deviation.

    python benchmarks/assignment_warm_start.py --batch-sizes 256 1024 2048 --dims 2 784
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # run as a file: put the repository root first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

from benchmarks.couplers import make_batch
from ot_cfm.couplers.multiscale import multiscale_assignment

NOISE_FRACTIONS = (0.0, 1e-4, 1e-3, 3e-3, 1e-2)


def median_ms(fn, reps: int):
    times, out = [], None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), out


def half_batch_duals(cost: np.ndarray) -> np.ndarray:
    """Column duals of the full problem estimated from POT's duals on the first half of the batch."""
    half = cost.shape[0] // 2
    mass = np.full(half, 1.0 / half)
    _, log = ot.emd(mass, mass, np.ascontiguousarray(cost[:half, :half]), numItermax=10**10, log=True)
    return (cost[:half] - log["u"][:, None]).min(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 784])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the dual noise")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| B | d | POT ms | scipy ms | scipy, exact duals ms | half-batch duals + scipy ms | multiscale ms "
          "| POT / best scipy variant | POT / multiscale |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    noise_rows = []
    for b in args.batch_sizes:
        for d in args.dims:
            x0, x1 = make_batch(b, d, seed=0)
            a, c = x0.double(), x1.double()
            cost = (-a @ c.T).numpy()
            sq = torch.cdist(a, c).pow(2).numpy()
            mass = np.full(b, 1.0 / b)
            t_pot, plan = median_ms(lambda: ot.emd(mass, mass, sq, numItermax=10**10), args.reps)
            best = plan.argmax(1)
            _, log = ot.emd(mass, mass, cost, numItermax=10**10, log=True)
            t_lsa, (_, j_lsa) = median_ms(lambda: linear_sum_assignment(cost), args.reps)
            t_exact, (_, j_exact) = median_ms(lambda: linear_sum_assignment(cost - log["v"][None]), args.reps)
            t_half, (_, j_half) = median_ms(
                lambda: linear_sum_assignment(cost - half_batch_duals(cost)[None]), args.reps)
            t_multi, j_multi = median_ms(lambda: multiscale_assignment(x0, x1).numpy(), args.reps)
            for name, j in (("scipy", j_lsa), ("exact duals", j_exact), ("half-batch duals", j_half),
                            ("multiscale", j_multi)):
                if not np.array_equal(j, best):
                    print(f"  note: {name} returned another permutation (a tie) at B={b}, d={d}")
            print(f"| {b} | {d} | {t_pot:.1f} | {t_lsa:.1f} | {t_exact:.1f} | {t_half:.1f} | {t_multi:.1f} | "
                  f"{t_pot / min(t_lsa, t_half):.2f}x | {t_pot / t_multi:.2f}x |", flush=True)
            rng = np.random.default_rng(args.seed)
            times = []
            for fraction in NOISE_FRACTIONS:
                v = log["v"] + fraction * cost.std() * rng.standard_normal(b)
                times.append(median_ms(lambda: linear_sum_assignment(cost - v[None]), args.reps)[0])
            noise_rows.append(f"| {b} | {d} | {t_pot:.1f} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    print("\nscipy on C - (v + noise), noise std as a fraction of the cost's std (ms):\n")
    print("| B | d | POT ms | " + " | ".join(f"{f:g}" for f in NOISE_FRACTIONS) + " |")
    print("|---:|---:|---:|" + "---:|" * len(NOISE_FRACTIONS))
    print("\n".join(noise_rows))


if __name__ == "__main__":
    main()
