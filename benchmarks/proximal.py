"""Benchmarks of the exact discrete field and of the semi-discrete solver.

(a) ``DiscreteBrenierPotential.velocity`` throughput against a plain matrix product of the
    same shape (B x d @ d x N) in the same process, interleaved, medians; peak RSS growth.
(b) TV cell-mass error against time of both solvers on moons (d = 2) and a Gaussian
    mixture (d = 64).
(c) Goal cases: N = 1000 moons to TV <= 0.005 within 60 s; the 1797 digits (d = 64) to
    TV <= 0.01 within 300 s. Every final TV is re-checked on independent i.i.d. samples.
(d) Threads (``--threads-check``, not part of the default run): ``fit_discrete_potential`` with
    1 and 2 torch threads, interleaved in one process, medians of 3; with ``--compete`` a busy
    Python process runs beside it (the case of a second job on the machine).
(e) Robustness of the digits fit (``--digits-fit``, not part of the default run): the training split
    of ``load_image_dataset("digits")`` (1438 images in [-1, 1], 64-d) fitted to TV <= 0.01 for
    every seed x scoring chunk size; each result re-measured on 2^24 fresh i.i.d. samples.

    python -m benchmarks.proximal --quick            # minutes (or: python benchmarks/proximal.py --quick)
    python -m benchmarks.proximal --out benchmarks/results/proximal.md   # full run
    python -m benchmarks.proximal --threads-check [--compete]             # (d) only
    python -m benchmarks.proximal --digits-fit --out benchmarks/results/proximal_digits_fit.md   # (e) only
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

# Run as a script, this file's folder heads sys.path and its name would shadow the ``proximal`` package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from ot_cfm.images import load_image_dataset  # noqa: E402
from proximal.discrete import DiscreteBrenierPotential  # noqa: E402
from proximal.semidiscrete import cell_masses, fit_discrete_potential  # noqa: E402


def moons(n: int, seed: int = 0) -> torch.Tensor:
    """i.i.d. two-moons points (noise 0.05), standardised per coordinate: (n, 2) float32."""
    from sklearn.datasets import make_moons
    x, _ = make_moons(n, noise=0.05, random_state=seed)
    x = (x - x.mean(0)) / x.std(0)
    return torch.tensor(x, dtype=torch.float32)


def gaussian_mixture(n: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """8-component Gaussian mixture in ``dim`` dimensions (means ~ N(0, 4 I), unit covariances),
    standardised to zero mean and unit average variance: (n, dim) float32."""
    gen = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(8, dim, generator=gen)
    x = means[torch.randint(0, 8, (n,), generator=gen)] + torch.randn(n, dim, generator=gen)
    x = x - x.mean(0)
    return x / x.square().mean().sqrt()


def digits() -> torch.Tensor:
    """scikit-learn's 1797 digits (8x8), pixels / 16, centred, divided by one global std so that
    the mean squared coordinate is 1 (constant pixels stay 0): (1797, 64) float32."""
    from sklearn.datasets import load_digits
    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    x = x - x.mean(0)
    return x / x.square().mean().sqrt()


def digits_train() -> torch.Tensor:
    """The training split of ``load_image_dataset("digits")`` as the library scales it (v / 8 - 1, in
    [-1, 1]), flattened: (1438, 64) float32."""
    return load_image_dataset("digits").train_images.flatten(1)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def velocity_throughput(sizes, dims, batch, repeats, seed=0):
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for dim in dims:
        for n in sizes:
            support = torch.randn(n, dim, generator=gen)
            potential = DiscreteBrenierPotential(support, None, torch.randn(n, generator=gen))
            x = torch.randn(batch, dim, generator=gen)
            ours, plain = [], []
            before = peak_rss_mib()
            potential.velocity(x, 0.5)
            ours_peak = peak_rss_mib() - before
            for _ in range(repeats):
                start = time.perf_counter()
                potential.velocity(x, 0.5)
                ours.append(time.perf_counter() - start)
                start = time.perf_counter()
                x @ support.T
                plain.append(time.perf_counter() - start)
            ours_t, plain_t = statistics.median(ours), statistics.median(plain)
            rows.append((n, dim, batch, ours_t * 1e3, plain_t * 1e3, ours_t / plain_t, ours_peak,
                         batch * n * 4 / 2 ** 20))
    return rows


def tv_check(potential, samples, seed=123):
    """TV on independent i.i.d. samples and its noise floor sqrt(2/pi)/2 sqrt(N/n)."""
    _, tv = cell_masses(potential, samples, generator=seed)
    return tv, math.sqrt(2 / math.pi) / 2 * math.sqrt(potential.n_support / samples)


def solve(support, method, tol, max_time, seed=0):
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        potential = fit_discrete_potential(support, tol=tol, max_time=max_time, method=method, generator=seed,
                                           progress=False)
    return potential, time.perf_counter() - start


def thread_cases(quick):
    """(name, support, fit keyword arguments) of (d): converged small fits, and fixed steps of larger ones."""
    gen = torch.Generator().manual_seed(0)
    cases = [("moons N=200 to tol 0.02", moons(200).double(), dict(tol=0.02)),
             ("moons N=1000 to tol 0.01", moons(1000).double(), dict(tol=0.01)),
             ("digits N=1797 d=64, 4 newton steps", digits(), dict(tol=1e-9, max_iters=4)),
             ("gaussian N=10000 d=64, 2 sgd steps", torch.randn(10000, 64, generator=gen), dict(tol=1e-9, max_iters=2))]
    return cases[:2] if quick else cases


def thread_timings(cases, repeats=3):
    """Rows (name, N, d, median s with 1 thread, with 2 threads, ratio 2/1), runs interleaved 1, 2, 1, 2, ..."""
    rows = []
    for name, support, kwargs in cases:
        times = {1: [], 2: []}
        for _ in range(repeats):
            for threads in (1, 2):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    fit_discrete_potential(support, generator=0, progress=False, max_time=600, threads=threads,
                                           **kwargs)
                times[threads].append(time.perf_counter() - start)
        one, two = statistics.median(times[1]), statistics.median(times[2])
        rows.append((name, support.shape[0], support.shape[1], one, two, two / one))
    return rows


def digits_fit_rows(seeds, chunks, tol, max_time, check_samples):
    """(e): one row per (seed, chunk): converged, seconds, steps, samples, the solver's TV (noise) and the
    TV re-measured on ``check_samples`` fresh i.i.d. samples with its floor sqrt(2/pi)/2 sqrt(N/n)."""
    support = digits_train()
    rows = []
    for seed in seeds:
        for chunk in chunks:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                potential = fit_discrete_potential(support, tol=tol, max_time=max_time, generator=seed,
                                                   chunk_size=chunk, progress=False)
            seconds = time.perf_counter() - start
            rep = potential.fit_report
            check, floor = tv_check(potential, check_samples, seed=1000 + seed)
            rows.append((seed, chunk, rep.converged, seconds, rep.iterations, rep.samples, rep.tv, rep.tv_noise,
                         check, floor, rep.threads))
            print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and budgets (minutes)")
    parser.add_argument("--out", default=None, help="write the markdown tables to this file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma list of sections to skip: a,b,c")
    parser.add_argument("--methods", default="newton,sgd", help="comma list of solvers for (b) and (c)")
    parser.add_argument("--threads-check", action="store_true", help="run only (d): fit times with 1 and 2 threads")
    parser.add_argument("--compete", action="store_true", help="(d) with a busy Python process beside it")
    parser.add_argument("--digits-fit", action="store_true", help="run only (e): the digits fit for seeds x chunks")
    parser.add_argument("--seeds", default="0,1,2", help="(e) comma list of seeds")
    parser.add_argument("--chunks", default="512,1458,2916", help="(e) comma list of scoring chunk sizes")
    parser.add_argument("--fit-max-time", type=float, default=None, help="(e) time budget of each fit, s")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    methods = list(filter(None, args.methods.split(",")))
    q = args.quick
    lines = [f"# proximal benchmarks\n\nCommand: `python -m benchmarks.proximal {' '.join(argv or sys.argv[1:])}`  ",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; timings are wall-clock on a shared machine.\n"]

    def emit(text):
        lines.append(text)
        print(text, flush=True)

    if args.threads_check:
        competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.compete else None
        try:
            emit(f"## (d) fit_discrete_potential with 1 and 2 threads{' beside a busy process' if competitor else ''}"
                 f" (medians of 3, interleaved)\n\nLoad average before: {os.getloadavg()[0]:.2f}\n")
            emit("| case | N | d | 1 thread s | 2 threads s | ratio 2 / 1 |")
            emit("|---|---|---|---|---|---|")
            for row in thread_timings(thread_cases(q)):
                emit("| {} | {} | {} | {:.2f} | {:.2f} | {:.2f} |".format(*row))
            emit(f"\nLoad average after: {os.getloadavg()[0]:.2f}")
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
        skip = {"a", "b", "c"}

    if args.digits_fit:
        seeds, chunks = (list(map(int, filter(None, v.split(",")))) for v in (args.seeds, args.chunks))
        check_samples = 2 ** 20 if q else 2 ** 24
        emit(f"## (e) digits training split (N = 1438, d = 64) to TV <= 0.01, seeds x scoring chunk sizes\n\n"
             f"Load average before: {os.getloadavg()[0]:.2f}. i.i.d. TV on {check_samples} fresh samples.\n")
        emit("| seed | chunk | converged | seconds | steps | samples | TV (noise) | i.i.d. TV | i.i.d. floor | threads |")
        emit("|---|---|---|---|---|---|---|---|---|---|")
        budget = args.fit_max_time or (120 if q else 1800)
        for row in digits_fit_rows(seeds, chunks, 0.01, budget, check_samples):
            emit("| {} | {} | {} | {:.1f} | {} | {} | {:.4f} ({:.4f}) | {:.4f} | {:.4f} | {} |".format(*row))
        emit(f"\nLoad average after: {os.getloadavg()[0]:.2f}")
        skip = {"a", "b", "c"}

    if "a" not in skip:
        emit("## (a) velocity throughput, t = 0.5, against B x d @ d x N (medians)\n")
        emit("| N | d | B | velocity ms | matmul ms | ratio | peak RSS growth MiB | matmul output MiB |")
        emit("|---|---|---|---|---|---|---|---|")
        sizes = [10 ** 4, 10 ** 5] if q else [10 ** 4, 10 ** 5, 10 ** 6]
        for row in velocity_throughput(sizes, [2, 64], 256, 3 if q else 7):
            emit("| {} | {} | {} | {:.2f} | {:.2f} | {:.2f} | {:.0f} | {:.0f} |".format(*row))

    if "b" not in skip:
        emit("\n## (b) TV against time (solver's own fresh-sample TV; re-checked on i.i.d. samples)\n")
        emit("| target | N | d | method | budget s | seconds | steps | TV | i.i.d. TV | i.i.d. floor |")
        emit("|---|---|---|---|---|---|---|---|---|---|")
        cases = [(100, 2), (100, 64)] if q else [(n, d) for d in (2, 64) for n in (100, 1000, 10000)]
        for n, dim in cases:
            support = moons(n) if dim == 2 else gaussian_mixture(n, dim)
            for method in methods:
                if method == "newton" and n > 4096:
                    emit(f"| {'moons' if dim == 2 else 'mixture'} | {n} | {dim} | newton | - | - | - | "
                         "(dense Laplacian: N > 4096 not supported) | | |")
                    continue
                budget = 20 if q else (60 if n <= 1000 else 300)
                potential, seconds = solve(support, method, 0.005, budget)
                rep = potential.fit_report
                check, floor = tv_check(potential, 2 ** 18 if q else 2 ** 21)
                emit(f"| {'moons' if dim == 2 else 'mixture'} | {n} | {dim} | {method} | {budget} | {seconds:.1f} | "
                     f"{rep.iterations} | {rep.tv:.4f} | {check:.4f} | {floor:.4f} |")

    if "c" not in skip:
        emit("\n## (c) goal cases\n")
        emit("| case | method | tol | budget s | converged | seconds | steps | samples | TV (noise) | "
             "i.i.d. TV | i.i.d. floor | cost lower bound | cost upper bound | map cost |")
        emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        goals = [("moons N=1000", moons(1000), 0.005, 60), ("digits N=1797", digits(), 0.01, 300)]
        for name, support, tol, budget in goals:
            for method in (["newton"] if q else methods):
                potential, seconds = solve(support, method, tol, budget if not q else 20)
                rep = potential.fit_report
                check, floor = tv_check(potential, 2 ** 18 if q else 2 ** 22)
                emit(f"| {name} | {method} | {tol} | {budget if not q else 20} | {rep.converged} | {seconds:.1f} | "
                     f"{rep.iterations} | {rep.samples} | {rep.tv:.4f} ({rep.tv_noise:.4f}) | {check:.4f} | "
                     f"{floor:.4f} | {rep.cost_lower_bound:.4f} | {rep.cost_upper_bound:.4f} | {rep.map_cost:.4f} |")

    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
