"""Exact minibatch couplers: ot-cfm against torchcfm, POT and scipy on the same batches.

Every method goes from torch tensors in to re-paired torch tensors out, in one process, with
the methods' repetitions interleaved in a shuffled order; the table reports medians. Besides
time it reports the reference's relative cost gap to the optimum (torchcfm calls POT with its
default ``numItermax``) and its duplicate fraction (share of returned pairs whose source already
appeared: torchcfm draws B pairs with replacement from the plan).

    python benchmarks/couplers.py --quick          # smoke run, seconds
    python benchmarks/couplers.py                  # full grid, writes benchmarks/results/couplers.md
    python benchmarks/couplers.py --exact-grid     # B 64..1024, d 2/32/784, with the pieces of our call
                                                   # (writes benchmarks/results/couplers_exact.md)

With ``--exact-grid`` each cell also times the pieces of our call on the same batches, interleaved with
the rest: the conversion to float64 and centring, the k-d orders and the cost GEMM, the solver, and its
certificate pass (``overhead`` = ours minus the solver alone).

``--scale S --offset O`` hands every method the points O + S x (in float64) instead of x and measures
the cost gaps on x itself, against scipy's optimum of x (the optimal pairing does not change): at
S = 1e-6 or O = 1e6 POT's absolute tolerances and the float64 cost's cancellation show up as gaps far
above round-off.
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

if not __package__:  # run as a file: put the repository root first, not this folder (its proximal.py)
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from torchcfm.optimal_transport import OTPlanSampler

from ot_cfm.couplers import multiscale
from ot_cfm.couplers.augmenting_paths import violations
from ot_cfm.couplers.base import centre_and_scale
from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.kd_pyramid import kd_order

FULL_B = (128, 256, 512, 1024, 2048, 4096)
FULL_D = (2, 64, 784, 3072)
# repetitions per batch size: fewer at large B, where torchcfm and POT take seconds per call
FULL_REPS = {128: 9, 256: 9, 512: 7, 1024: 5, 2048: 3, 4096: 1}
# B = 4096: one repetition, d in {2, 784} only, no scipy reference (it took 40 to 80 s per call at B = 2048)
FULL_4096_D = (2, 784)
CROSS_B = (128, 256, 512, 1024, 2048)
CROSS_D = (2, 4, 8, 16, 64, 784)
EXACT_B = (64, 128, 256, 512, 1024)
EXACT_D = (2, 32, 784)
EXACT_REPS = {64: 21, 128: 15, 256: 11, 512: 7, 1024: 5}


def make_batch(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source N(0, I_d); target a mixture of 8 Gaussians (std 0.5) with N(0, 4 I) centres, float32."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, d, generator=g)
    centres = 2.0 * torch.randn(8, d, generator=g)
    x1 = centres[torch.randint(8, (b,), generator=g)] + 0.5 * torch.randn(b, d, generator=g)
    return x0, x1


def full_cost(x0: torch.Tensor, x1: torch.Tensor) -> np.ndarray:
    return torch.cdist(x0.double(), x1.double()).pow(2).numpy()


def run_torchcfm(x0, x1, store):
    # the body of OTPlanSampler.sample_plan, unrolled to keep its plan and indices for the report
    sampler = OTPlanSampler(method="exact")
    pi = sampler.get_map(x0, x1)
    i, j = sampler.sample_map(pi, x0.shape[0])
    store.update(pi=pi, i=i)
    return x0[i], x1[j]


def run_pot(x0, x1, store):
    b = x0.shape[0]
    a = np.full(b, 1.0 / b)
    plan = ot.emd(a, a, full_cost(x0, x1), numItermax=10**10)
    j = torch.from_numpy(plan.argmax(1))
    return x0, x1[j]


def run_scipy(x0, x1, store):
    _, j = linear_sum_assignment(full_cost(x0, x1))
    return x0, x1[torch.from_numpy(j)]


def run_ours(x0, x1, store, coupler=ExactOTCoupler("auto")):
    out = coupler.pair(x0, x1)
    store.update(solver=coupler.choose_solver(x0.shape[0], x1.shape[0], x0[0].numel()))
    return out


METHODS = {"ours": run_ours, "torchcfm": run_torchcfm, "pot": run_pot, "scipy": run_scipy}


def ours_pieces(x0, x1) -> dict:
    """The pieces of one ``ExactOTCoupler("auto")`` call on equal batches x0, x1 (B, d), as callables:
    float64 conversion and centring; k-d orders (where there are coarse levels) and the cost GEMM; the
    solver on that cost; the certificate pass over all B^2 reduced costs."""
    n, dim = x0.shape
    base = multiscale.dense_below(dim)
    levels = n > base and dim <= multiscale.LEVELS_UP_TO_DIM
    a, b, _ = centre_and_scale(x0, x1, separately=True, dtype=torch.float64, scaled=False)

    def cost_matrix():  # in k-d order where there are levels, as the solver gets it
        p, q = (t[torch.from_numpy(kd_order(t.numpy()))] for t in (a, b)) if levels else (a, b)
        return torch.mm(p.neg(), q.T)

    cost = cost_matrix().numpy()
    tol = 2e-10 * np.abs(cost).max()
    neighbours = multiscale.multiscale_assignment.__kwdefaults__["neighbours"]
    sigma, u, v = multiscale._solve(cost, base, neighbours, tol, levels)
    rows, cols = np.empty(n, np.int64), np.empty(n, np.int64)

    return {"centre": lambda *_: centre_and_scale(x0, x1, separately=True, dtype=torch.float64, scaled=False),
            "cost": lambda *_: cost_matrix(),
            "solve+cert": lambda *_: multiscale._solve(cost, base, neighbours, tol, levels),
            "cert": lambda *_: violations(cost, u, v, sigma, tol, 1, rows, cols)}


#: the clock of ``interleaved``: wall time by default; ``--clock cpu`` takes the calling thread's CPU time
#: (every method here computes in that one thread), which a machine shared with other jobs inflates less
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = CLOCKS["wall"]


def interleaved(methods: dict, x0, x1, reps: int, max_seconds: float, seed: int):
    """Median-ready times, last outputs and per-method stores, methods shuffled within each repetition."""
    times = {m: [] for m in methods}
    stores = {m: {} for m in methods}
    outs = {}
    rng = random.Random(seed)
    with warnings.catch_warnings():  # one untimed call each: a first call's imports and compilation are no per-call cost
        warnings.simplefilter("ignore")
        for m in methods:
            methods[m](x0, x1, {})
    for _ in range(reps):
        order = list(methods)
        rng.shuffle(order)
        for m in order:
            if times[m] and sum(times[m]) > max_seconds:
                continue  # a slow method keeps the repetitions it had
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = clock()
                outs[m] = methods[m](x0, x1, stores[m])
                times[m].append(clock() - t)
    return times, outs, stores


def bench_cell(b: int, d: int, reps: int, max_seconds: float, seed: int, with_scipy: bool = True,
               scale: float = 1.0, offset: float = 0.0, pieces: bool = False) -> dict:
    x0, x1 = make_batch(b, d, seed)
    if scale != 1.0 or offset != 0.0:  # in float64, which keeps the float32 points' differences
        given = tuple(offset + scale * x.double() for x in (x0, x1))
    else:
        given = (x0, x1)
    methods = {m: f for m, f in METHODS.items() if with_scipy or m != "scipy"}
    if pieces:
        methods.update(ours_pieces(*given))
    times, outs, stores = interleaved(methods, *given, reps, max_seconds, seed)
    c = full_cost(x0, x1)

    def back(x):  # the returned points as points of x0, x1 (exact up to the rounding of the offset)
        return (x.double() - offset) / scale

    pair_cost = {m: float(((back(o[0]) - back(o[1])) ** 2).sum(1).mean()) for m, o in outs.items() if m in METHODS}
    opt = min(v for m, v in pair_cost.items() if m != "torchcfm")
    if given[0] is not x0:  # every method may have been misled: the optimum of x itself, by scipy
        rows, cols = linear_sum_assignment(c)
        opt = min(opt, float(c[rows, cols].mean()))
    tc = stores["torchcfm"]
    return {
        "B": b, "d": d, "solver": stores["ours"]["solver"],
        "ms": {m: 1e3 * statistics.median(times[m]) if times.get(m) else float("nan") for m in (*METHODS, *PIECES)},
        "n": {m: len(times.get(m, ())) for m in METHODS},
        "tc_gap": (float((tc["pi"] * c).sum()) - opt) / opt,
        "tc_dup": 1.0 - len(np.unique(tc["i"])) / b,
        "ours_gap": (pair_cost["ours"] - opt) / opt,
        "ref_gaps": {m: (pair_cost[m] - opt) / opt for m in ("pot", "scipy") if m in pair_cost},
        "gap_to_scipy": (pair_cost["ours"] - pair_cost["scipy"]) / pair_cost["scipy"] if "scipy" in pair_cost else float("nan"),
    }


PIECES = ("centre", "cost", "solve+cert", "cert")


def exact_table(rows: list[dict]) -> str:
    """Ours against torchcfm, POT and scipy, with the pieces of our call and the goal ratios."""
    head = ("| B | d | ours ms | torchcfm ms | POT emd ms | scipy LSA ms | torchcfm / ours | min(POT, scipy) / ours "
            "| centring ms | k-d + cost ms | solver ms | certificate ms | overhead ms | cost gap to scipy | reps |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        ms = r["ms"]
        solver = ms["solve+cert"] - ms["cert"]
        lines.append(f"| {r['B']} | {r['d']} | {ms['ours']:.2f} | {ms['torchcfm']:.2f} | {ms['pot']:.2f} | {ms['scipy']:.2f} | "
                     f"{ms['torchcfm'] / ms['ours']:.2f}x | {min(ms['pot'], ms['scipy']) / ms['ours']:.2f}x | "
                     f"{ms['centre']:.2f} | {ms['cost']:.2f} | {solver:.2f} | {ms['cert']:.2f} | {ms['ours'] - solver:.2f} | "
                     f"{r['gap_to_scipy']:.0e} | {r['n']['ours']} |")
    return head + "\n".join(lines) + "\n"


CROSS_BACKENDS = ("scipy", "multiscale", "pot")


def crossover_cell(b: int, d: int, reps: int, max_seconds: float, seed: int) -> dict:
    """Our backends on one batch: which one ``auto`` should pick there."""
    x0, x1 = make_batch(b, d, seed)
    methods = {k: (lambda x, y, store, c=ExactOTCoupler(k): c.pair(x, y)) for k in CROSS_BACKENDS}
    times, _, _ = interleaved(methods, x0, x1, reps, max_seconds, seed)
    return {"B": b, "d": d, **{k: 1e3 * statistics.median(v) for k, v in times.items()}}


def crossover_table(rows: list[dict]) -> str:
    head = ("| B | d | ours scipy ms | ours multiscale ms | ours POT ms | fastest | POT / fastest |\n"
            "|---:|---:|---:|---:|---:|---|---:|\n")
    lines = []
    for r in rows:
        fastest = min(CROSS_BACKENDS, key=r.get)
        lines.append(f"| {r['B']} | {r['d']} | {r['scipy']:.1f} | {r['multiscale']:.1f} | {r['pot']:.1f} | "
                     f"{fastest} | {r['pot'] / r[fastest]:.2f} |")
    return head + "\n".join(lines) + "\n"


def table(rows: list[dict], reference_gaps: bool = False) -> str:
    """The results table; with ``reference_gaps`` (scaled or offset points) POT's and scipy's cost gaps too."""
    extra = " POT emd cost gap | scipy LSA cost gap |" if reference_gaps else ""
    head = ("| B | d | ours (backend) ms | torchcfm ms | POT emd ms | scipy LSA ms | torchcfm / ours "
            f"| torchcfm cost gap | torchcfm duplicates | ours cost gap |{extra} reps (ours, torchcfm, POT, scipy) |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (2 * reference_gaps) + "---|\n")
    lines = []
    for r in rows:
        ms, n = r["ms"], r["n"]
        ref = "".join(f" {r['ref_gaps'].get(m, float('nan')):.1e} |" for m in ("pot", "scipy")) \
            if reference_gaps else ""
        lines.append(f"| {r['B']} | {r['d']} | {ms['ours']:.1f} ({r['solver']}) | {ms['torchcfm']:.1f} | "
                     f"{ms['pot']:.1f} | {ms['scipy']:.1f} | {ms['torchcfm'] / ms['ours']:.2f}x | "
                     f"{r['tc_gap']:.1e} | {100 * r['tc_dup']:.1f}% | {r['ours_gap']:.0e} |{ref} "
                     f"{n['ours']}, {n['torchcfm']}, {n['pot']}, {n['scipy']} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: B in {128, 256}, d in {2, 64}, 2 reps")
    parser.add_argument("--exact-grid", action="store_true",
                        help="B in {64, ..., 1024}, d in {2, 32, 784} with the pieces of our call, no crossover table")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--dims", type=int, nargs="+")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="stop repeating a method in a cell once its calls there exceed this many seconds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared 2-core machine two spinning OpenMP threads "
                             "made a 256 x 784 matmul 10x slower than one thread")
    parser.add_argument("--scipy-below", type=int, default=4096,
                        help="time the scipy reference only for B below this (it is the slowest at large B)")
    parser.add_argument("--crossover-batch-sizes", type=int, nargs="*",
                        help="batch sizes of the backend crossover table (default 256 1024; none: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or the calling thread's CPU time (steadier on a shared machine)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="hand every method offset + scale * x (float64) instead of x; gaps are measured on x")
    parser.add_argument("--offset", type=float, default=0.0, help="see --scale")
    parser.add_argument("--output", type=Path, help="markdown file for the table (full mode default: "
                        "benchmarks/results/couplers.md; quick mode: none)")
    args = parser.parse_args(argv)
    bs = args.batch_sizes or ((128, 256) if args.quick else EXACT_B if args.exact_grid else FULL_B)
    ds = args.dims or ((2, 64) if args.quick else EXACT_D if args.exact_grid else FULL_D)
    default_output = "couplers_exact.md" if args.exact_grid else "couplers.md"
    output = args.output or (None if args.quick else Path(__file__).parent / "results" / default_output)
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    np.random.seed(args.seed)  # torchcfm samples its pairs with the global numpy RNG
    command = "python benchmarks/couplers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"# Exact minibatch couplers\n\nCommand: `{command.strip()}`  \nDate: {datetime.date.today()}  \n"
              f"torch {torch.__version__}, POT {ot.__version__}, {torch.get_num_threads()} torch threads. "
              f"{'' if args.scale == 1.0 and args.offset == 0.0 else f'Points {args.offset:g} + {args.scale:g} x. '}"
              f"Median {'wall' if args.clock == 'wall' else 'CPU (calling thread)'} time per call, tensors in to re-paired "
              "tensors out, methods interleaved. "
              + ("Cost gap to scipy: (ours - scipy) / scipy on the same batch. Overhead: ours minus the solver alone.\n\n"
                 if args.exact_grid else
                 "Cost gap: (cost - optimum) / optimum, optimum = the best of ours, POT emd and scipy "
                 "(each run with no iteration cap)"
                 f"{'' if args.scale == 1.0 and args.offset == 0.0 else ' and scipy on the untransformed x, costs on x'}"
                 ". Duplicates: share of torchcfm's returned pairs whose source was already returned.\n\n"))
    if args.crossover_batch_sizes is not None:  # given, possibly empty: skip the crossover table
        cross_b = args.crossover_batch_sizes
    else:
        cross_b = () if args.exact_grid else (128,) if args.quick else CROSS_B
    cross, rows = [], []
    transformed = args.scale != 1.0 or args.offset != 0.0

    def write() -> str:
        text = header + (exact_table(rows) if args.exact_grid else table(rows, transformed))
        if cross:
            text += ("\n## auto: our backends against each other (same timing rules)\n\n" + crossover_table(cross))
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(text)
        return text

    for b in cross_b:
        for d in (CROSS_D[:3] if args.quick else CROSS_D):
            cross.append(crossover_cell(b, d, 2 if args.quick else 5, args.max_seconds, args.seed))
            print(crossover_table(cross[-1:]).splitlines()[-1], flush=True)
            write()
    for b in bs:
        for d in ds:
            if b >= 4096 and not args.batch_sizes and d not in FULL_4096_D:
                continue
            reps = 2 if args.quick else EXACT_REPS.get(b, 3) if args.exact_grid else FULL_REPS.get(b, 3)
            rows.append(bench_cell(b, d, reps, args.max_seconds, args.seed, with_scipy=b < args.scipy_below,
                                   scale=args.scale, offset=args.offset, pieces=args.exact_grid))
            print((exact_table if args.exact_grid else table)(rows[-1:]).splitlines()[-1] if args.exact_grid
                  else table(rows[-1:], transformed).splitlines()[-1], flush=True)
            write()
    print(write())


if __name__ == "__main__":
    main()
