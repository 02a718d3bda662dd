"""Entropic couplers: ot-cfm's torch Sinkhorn against POT's log-domain Sinkhorn on the same batches.

Both solve the same problem: uniform weights, C_ij = |x0_i - x1_j|^2, the same absolute epsilon
(``--epsilons`` times the mean cost, ot-cfm's default scaling) and float64 inputs. Stopping rules
differ in form: ours stops once its L1 row-marginal error is below ``--tol`` (checked every
iteration); POT's ``sinkhorn_log`` checks the L2 norm of its marginal error every 10 iterations, so
it gets ``stopThr = tol / sqrt(B)``, which bounds the L1 error by ``tol`` as well. The
table gives median times, their ratio, iteration counts and the L1 marginal errors of both plans
(measured here, on both marginals).

    python benchmarks/sinkhorn.py --output benchmarks/results/sinkhorn.md

Two more tables go into the same file when asked: ``--anneal-batch B`` times epsilon scaling
(``anneal_from``) against a cold start at small epsilons, same tolerance, and ``--assign-batch-sizes``
measures the auction permutation (``SinkhornCoupler.assignment``) against scipy's ``linear_sum_assignment``:

    python benchmarks/sinkhorn.py --anneal-batch 1024 --assign-batch-sizes 256 1024 \
        --output benchmarks/results/sinkhorn.md

``--large`` runs one solve per cell in a fresh process (float32, ``--threads`` torch threads) at
B = 4096, 16384, 65536 (d = 2) and 1024, 4096, 16384 (d = 784) and reports time, iterations, marginal
error, sharpness and peak memory: the peak resident set size of that process (``resource.getrusage``,
``ru_maxrss``), and that peak less the resident size after the imports (the batches, their centred
copies, the potentials and the work buffer):

    python benchmarks/sinkhorn.py --large --threads 2 --output benchmarks/results/sinkhorn_large.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

if not __package__:  # run as a file: put the repository root first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

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


def anneal_cell(b: int, d: int, rel_eps: float, anneal_from: float, tol: float, reps: int) -> dict:
    """Cold start against epsilon scaling from ``anneal_from`` (factor 0.5) to the same epsilon and tolerance."""
    x0, x1 = (x.double() for x in make_batch(b, d, seed=0))
    cold = SinkhornCoupler(rel_eps, tol=tol, max_iters=100_000)
    warm = SinkhornCoupler(rel_eps, tol=tol, max_iters=100_000, anneal_from=anneal_from)
    t_cold, r_cold = median_ms(lambda: cold.solve(x0, x1), reps)
    t_warm, r_warm = median_ms(lambda: warm.solve(x0, x1), reps)
    return {"B": b, "d": d, "eps": rel_eps, "from": anneal_from, "t_cold": t_cold, "t_warm": t_warm,
            "it_cold": r_cold.n_iters, "it_warm": r_warm.n_iters, "err": (r_cold.marginal_error, r_warm.marginal_error),
            "cost_diff": abs(r_warm.cost - r_cold.cost) / r_cold.cost, "sharpness": r_warm.sharpness}


def anneal_table(rows: list[dict]) -> str:
    head = ("| B | d | eps / mean cost | anneal from | iterations (cold, annealed) | ms (cold, annealed) | cold / annealed "
            "| marginal error (cold, annealed) | relative cost difference | sharpness |\n"
            "|---:|---:|---:|---:|---|---|---:|---|---:|---:|\n")
    return head + "\n".join(f"| {r['B']} | {r['d']} | {r['eps']:g} | {r['from']:g} | {r['it_cold']}, {r['it_warm']} | "
                            f"{r['t_cold']:.0f}, {r['t_warm']:.0f} | {r['t_cold'] / r['t_warm']:.2f}x | "
                            f"{r['err'][0]:.1e}, {r['err'][1]:.1e} | {r['cost_diff']:.1e} | {r['sharpness']:.4f} |"
                            for r in rows) + "\n"


def assign_cell(b: int, d: int, rel_eps: float, assign_tol: float, reps: int) -> dict:
    """The auction permutation's mean cost against scipy's optimum on the same float64 points, and both times."""
    x0, x1 = (x.double() for x in make_batch(b, d, seed=0))
    cost = full_cost(x0, x1)
    coupler = SinkhornCoupler(rel_eps, assign_tol=assign_tol, max_iters=100_000)
    t_ours, j = median_ms(lambda: coupler.assignment(x0, x1), reps)
    if sorted(j.tolist()) != list(range(b)):
        raise AssertionError("the auction did not return a permutation")
    t_scipy, (rows, cols) = median_ms(lambda: linear_sum_assignment(full_cost(x0, x1)), reps)
    opt, ours = cost[rows, cols].mean(), cost[np.arange(b), j.numpy()].mean()
    return {"B": b, "d": d, "eps": rel_eps, "delta": assign_tol, "gap": (ours - opt) / opt,
            "bound": assign_tol * cost.mean() / opt, "t_ours": t_ours, "t_scipy": t_scipy,
            "exact": float((j.numpy() == cols).mean())}


def assign_table(rows: list[dict]) -> str:
    head = ("| B | d | eps / mean cost | delta / mean cost | relative gap to optimum | stated bound delta / optimum "
            "| pairs as in scipy | ours ms | scipy ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "\n".join(f"| {r['B']} | {r['d']} | {r['eps']:g} | {r['delta']:g} | {r['gap']:.1e} | {r['bound']:.1e} | "
                            f"{r['exact']:.3f} | {r['t_ours']:.0f} | {r['t_scipy']:.0f} |" for r in rows) + "\n"


LARGE = [(1024, 784), (4096, 784), (16384, 784), (4096, 2), (16384, 2), (65536, 2)]


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def large_cell(b: int, d: int, rel_eps: float, tol: float) -> dict:
    """One float32 solve in this process, which should hold nothing else: its peak RSS is the solve's."""
    base = rss_mib()
    x0, x1 = make_batch(b, d, seed=0)
    start = time.perf_counter()
    res = SinkhornCoupler(rel_eps, tol=tol, max_iters=10_000).solve(x0, x1)
    seconds = time.perf_counter() - start
    return {"B": b, "d": d, "eps": rel_eps, "s": seconds, "it": res.n_iters, "err": res.marginal_error,
            "sharpness": res.sharpness, "cost": res.cost, "base": base, "peak": rss_mib(),
            "inputs": 2 * x0.numel() * x0.element_size() / 2**20}


def large_table(rows: list[dict]) -> str:
    head = ("| B | d | eps / mean cost | s | iterations | s / iteration | marginal error | sharpness | <P, C> "
            "| input batches MiB | peak RSS MiB | peak RSS - RSS after imports, MiB |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "\n".join(f"| {r['B']} | {r['d']} | {r['eps']:g} | {r['s']:.1f} | {r['it']} | {r['s'] / r['it']:.2f} | "
                            f"{r['err']:.1e} | {r['sharpness']:.4f} | {r['cost']:.4g} | {r['inputs']:.1f} | "
                            f"{r['peak']:.0f} | {r['peak'] - r['base']:.0f} |" for r in rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 784])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.05, 0.01])
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--anneal-batch", type=int, default=0, help="B of the annealing table (0: none)")
    parser.add_argument("--anneal-epsilons", type=float, nargs="+", default=[0.01, 0.003, 0.001])
    parser.add_argument("--anneal-from", type=float, default=1.0)
    parser.add_argument("--assign-batch-sizes", type=int, nargs="*", default=[], help="B of the assignment table")
    parser.add_argument("--assign-tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    parser.add_argument("--large", action="store_true", help="the large-B table instead, one process per cell")
    parser.add_argument("--large-epsilon", type=float, default=0.05)
    parser.add_argument("--cells", nargs="+", metavar="B,D", help="the --large cells to run (default: all)")
    parser.add_argument("--cell", type=int, nargs=2, metavar=("B", "D"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help="markdown file for the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cell is not None:  # a child of --large
        print(json.dumps(large_cell(*args.cell, args.large_epsilon, args.tol)), flush=True)
        return
    if args.large:
        return run_large(args, argv)
    command = "python benchmarks/sinkhorn.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"# Entropic couplers\n\nCommand: `{command.strip()}`  \nDate: {datetime.date.today()}  \n"
              f"torch {torch.__version__}, POT {ot.__version__}, {torch.get_num_threads()} torch threads, float64, "
              f"medians of {args.reps}. Marginal error: the larger L1 error of the two marginals.\n\n")
    rows, sections = [], []
    for b in args.batch_sizes:
        for d in args.dims:
            for eps in args.epsilons:
                rows.append(cell(b, d, eps, args.tol, args.reps))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    sections.append(table(rows))
    if args.anneal_batch:
        anneal = []
        for eps in args.anneal_epsilons:
            anneal.append(anneal_cell(args.anneal_batch, 2, eps, args.anneal_from, args.tol, args.reps))
            print(anneal_table(anneal[-1:]).splitlines()[-1], flush=True)
        sections.append("## Epsilon scaling\n\nFrom `anneal_from` times the mean cost down to epsilon, halving it at each stage, "
                        "each stage warm-started from the last and run to the same L1 tolerance; iterations summed over "
                        "the stages. Relative cost difference: |<P_annealed, C> - <P_cold, C>| / <P_cold, C>.\n\n" + anneal_table(anneal))
    if args.assign_batch_sizes:
        assign = []
        for b in args.assign_batch_sizes:
            for delta in args.assign_tols:
                assign.append(assign_cell(b, 2, 0.01, delta, args.reps))
                print(assign_table(assign[-1:]).splitlines()[-1], flush=True)
        sections.append("## Hard assignment\n\n`SinkhornCoupler.assignment` (Sinkhorn at eps, then the auction with bid increment "
                        "delta) against scipy's `linear_sum_assignment` on the full float64 cost. Gap: mean cost of our "
                        "permutation over the optimal one, minus 1; the stated bound is delta / optimal mean cost. "
                        "Times: ours includes the Sinkhorn solve, scipy's the cost matrix.\n\n" + assign_table(assign))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(header + "\n".join(sections))


def run_large(args: argparse.Namespace, argv: list[str] | None) -> None:
    """Each cell of LARGE in a fresh process, so that each peak RSS belongs to one solve."""
    command = "python benchmarks/sinkhorn.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    cells = LARGE if args.cells is None else [tuple(int(v) for v in cell.split(",")) for cell in args.cells]
    for b, d in cells:
        out = subprocess.run([sys.executable, __file__, "--cell", str(b), str(d), "--threads", str(args.threads),
                              "--tol", str(args.tol), "--large-epsilon", str(args.large_epsilon)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.splitlines()[-1]))
        print(large_table(rows[-1:]).splitlines()[-1], flush=True)
        if args.output is not None:  # after every cell: a long run leaves what it has measured
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(
                f"# Entropic couplers at large B\n\nCommand: `{command.strip()}`  \nDate: {datetime.date.today()}  \n"
                f"torch {torch.__version__}, {args.threads} torch threads, float32, one solve per cell, each in a fresh "
                "process; make_batch's points (N(0, I) to 8 Gaussians). Peak memory: `ru_maxrss` of that process "
                "(resource.getrusage), and that peak less the RSS after the imports.\n\n" + large_table(rows))


if __name__ == "__main__":
    main()
