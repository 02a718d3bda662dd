"""Entropic couplers: ot-cfm's torch Sinkhorn against POT's log-domain Sinkhorn on the same batches.

Both solve the same problem: uniform weights, C_ij = |x0_i - x1_j|^2, the same absolute epsilon
(``--epsilons`` times the mean cost, ot-cfm's default scaling) and float64 inputs. Stopping rules
differ in form: ours stops once its L1 row-marginal error is below ``--tol`` (checked every
iteration); POT's ``sinkhorn_log`` checks the L2 norm of its marginal error every 10 iterations, so
it gets ``stopThr = tol / sqrt(B)``, which bounds the L1 error by ``tol`` as well. The
table gives median times, their ratio, iteration counts and the L1 marginal errors of both plans
(measured here, on both marginals).

    python benchmarks/sinkhorn.py --output benchmarks/results/sinkhorn.md
"""

from __future__ import annotations

import argparse
import datetime
import sys
import warnings
from pathlib import Path

if not __package__:  # run as a file: put the repository root first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import ot
import torch

from benchmarks.assignment_warm_start import median_ms
from benchmarks.couplers import full_cost, make_batch
from ot_cfm.couplers.sinkhorn import SinkhornCoupler


def marginal_error(plan: np.ndarray) -> float:
    """Largest of the two L1 marginal errors of a plan against uniform weights."""
    return max(np.abs(plan.sum(1) - 1 / plan.shape[0]).sum(), np.abs(plan.sum(0) - 1 / plan.shape[1]).sum())


def cell(b: int, d: int, rel_eps: float, tol: float, reps: int) -> dict:
    x0, x1 = (x.double() for x in make_batch(b, d, seed=0))
    ours = SinkhornCoupler(rel_eps, tol=tol, max_iters=100_000)
    t_ours, res = median_ms(lambda: ours.solve(x0, x1), reps)
    cost = full_cost(x0, x1)
    plan_ours = np.exp((res.f.numpy()[:, None] + res.g.numpy()[None, :] - cost) / res.epsilon) / b**2
    mass = np.full(b, 1.0 / b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns when it stops at numItermax
        t_pot, (plan_pot, log) = median_ms(lambda: ot.sinkhorn(mass, mass, cost, res.epsilon, method="sinkhorn_log",
                                                                numItermax=100_000, stopThr=tol / b**0.5, log=True), reps)
    return {"B": b, "d": d, "eps": rel_eps, "ours": t_ours, "pot": t_pot, "it_ours": res.n_iters,
            "it_pot": log["niter"], "err_ours": marginal_error(plan_ours), "err_pot": marginal_error(plan_pot)}


def table(rows: list[dict]) -> str:
    head = ("| B | d | eps / mean cost | ours ms | POT sinkhorn_log ms | POT / ours | iterations (ours, POT) "
            "| marginal error (ours, POT) |\n|---:|---:|---:|---:|---:|---:|---|---|\n")
    return head + "\n".join(f"| {r['B']} | {r['d']} | {r['eps']:g} | {r['ours']:.1f} | {r['pot']:.1f} | "
                            f"{r['pot'] / r['ours']:.2f}x | {r['it_ours']}, {r['it_pot']} | "
                            f"{r['err_ours']:.1e}, {r['err_pot']:.1e} |" for r in rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 784])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.05, 0.01])
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="markdown file for the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/sinkhorn.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"# Entropic couplers\n\nCommand: `{command.strip()}`  \nDate: {datetime.date.today()}  \n"
              f"torch {torch.__version__}, POT {ot.__version__}, {torch.get_num_threads()} torch threads, float64, "
              f"medians of {args.reps}. Marginal error: the larger L1 error of the two marginals.\n\n")
    rows = []
    for b in args.batch_sizes:
        for d in args.dims:
            for eps in args.epsilons:
                rows.append(cell(b, d, eps, args.tol, args.reps))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(header + table(rows))


if __name__ == "__main__":
    main()
