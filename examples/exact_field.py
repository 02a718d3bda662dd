"""The exact OT-CFM field of an empirical target, and two learned fields measured against it.

An empirical target (N i.i.d. moons points) has the Brenier potential ``phi(x) = max_j <x, y_j> - g_j``
of the semi-discrete OT problem from N(0, I); ``proximal.fit_discrete_potential`` fits ``g``. Its
Laguerre cells split the source plane, ``T(x0)`` is the support point of x0's cell, the population
OT-CFM paths ``x_t = (1 - t) x0 + t T(x0)`` are straight, and ``proximal.ExactVelocityField`` is
their velocity field ``u_t``: integrating it with Euler, even in one step, lands on ``T(x0)``.

Two MLPs are trained with the same Trainer settings, steps, batch size and seeds; only the
coupler differs:

* minibatch OT-CFM: ``ExactOTCoupler`` pairs a noise batch with a batch of i.i.d. rows of the points;
* semidiscrete (population) OT-CFM: ``SemidiscreteCoupler(potential)`` pairs each noise x0 with T(x0).

Each model is measured against the exact field of the fitted potential (``proximal.field_error``:
``E |v - u|^2 / E |u|^2`` on the OT path, so the zero field scores 1) and by W2 of its samples
at Euler NFE 1, 2, 4 and dopri5 (``ot_cfm.evaluate_samples``).

Caveat that the report states with numbers: the field is exact for the *fitted* potential, whose
cell masses differ from the uniform weights 1/N by the fit's TV error. The semidiscrete model
learns that potential's coupling; the minibatch model learns from the uniform empirical measure.

    python examples/exact_field.py --out examples/results      # full run (see examples/results/exact_field.md)
    python examples/exact_field.py --quick --out runs/exact_field_quick
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.semidiscrete import SemidiscreteCoupler
from ot_cfm.data import TensorSampler, gaussian_sampler, toy_sampler
from ot_cfm.evaluation import evaluate_samples
from ot_cfm.evaluation.plotting import save_figure
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.solvers.ode import sample
from ot_cfm.training import TrainConfig, Trainer
from proximal.field import ExactVelocityField, field_error
from proximal.semidiscrete import cell_masses, fit_discrete_potential

TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
NFES = (1, 2, 4)
METHODS = ("minibatch", "minibatch-cells", "semidiscrete")
LABELS = {"minibatch": "minibatch OT-CFM, uniform rows",
          "minibatch-cells": "minibatch OT-CFM, rows weighted by the fitted cell masses",
          "semidiscrete": "semidiscrete OT-CFM (SemidiscreteCoupler)"}
COLOURS = {"minibatch": "tab:blue", "minibatch-cells": "tab:purple", "semidiscrete": "tab:orange"}


class WeightedSampler:
    """Draws i.i.d. rows of ``data`` (N, d) with probabilities ``weights`` (N,)."""

    def __init__(self, data: torch.Tensor, weights: torch.Tensor):
        self.data, self.weights = data, weights.to(torch.float64)

    def __call__(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.data[torch.multinomial(self.weights, n, replacement=True, generator=generator)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", type=int, default=2000, help="number of i.i.d. moons points (the empirical target)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the points and of the potential fit")
    p.add_argument("--fit-tol", type=float, default=0.01, help="TV cell-mass tolerance of the potential fit")
    p.add_argument("--fit-max-time", type=float, default=200.0, help="time limit of the potential fit (s)")
    p.add_argument("--mass-samples", type=int, default=2 ** 21,
                   help="fresh source samples estimating the fitted cell masses (target of 'minibatch-cells')")
    p.add_argument("--steps", type=int, default=3000, help="training steps per model")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (model init, data, t)")
    p.add_argument("--field-samples", type=int, default=8192, help="source samples of each field-error estimate")
    p.add_argument("--eval-samples", type=int, default=2000, help="samples of each W2 estimate")
    p.add_argument("--paths", type=int, default=300, help="trajectories drawn in the first figure")
    p.add_argument("--euler-steps", type=int, default=4, help="Euler steps through the exact field in the figure")
    p.add_argument("--train-threads", type=int, default=1,
                   help="torch threads while training and evaluating (tiny MLPs run fastest on one)")
    p.add_argument("--out", default="runs/exact_field", help="folder of exact_field*.png and exact_field.md")
    p.add_argument("--quick", action="store_true", help="small, fast settings for tests (about 30 s)")
    if p.parse_known_args(argv)[0].quick:  # new defaults: flags given explicitly still win
        # the quick fit converges in about 1 s; its time limit only guards against a hang
        p.set_defaults(points=300, fit_tol=0.05, fit_max_time=120.0, steps=300, seeds=[0], field_samples=4096,
                       eval_samples=500, paths=100, mass_samples=2 ** 18)
    return p.parse_args(argv)


def fit_potential(args):
    """The target points and their fitted discrete Brenier potential (N(0, I) source)."""
    points = toy_sampler("moons")(args.points, torch.Generator().manual_seed(args.data_seed))
    potential = fit_discrete_potential(points, tol=args.fit_tol, max_time=args.fit_max_time,
                                       generator=args.data_seed, progress=False)
    return points, potential


def exact_trajectories(potential, n: int, euler_steps: int, seed: int) -> dict:
    """x0, T(x0), and Euler through the exact field (float64, so that cell ties are not rounding artefacts)."""
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    target = potential.transport_map(x0)
    field = ExactVelocityField(potential)
    out = sample(field, x0, solver="euler", steps=euler_steps, return_trajectory=True)
    error = (out.x - target).norm(dim=1).max().item()
    return {"x0": x0, "target": target, "trajectory": out.trajectory, "times": out.times, "endpoint_error": error}


def train(method: str, potential, points, masses, seed: int, args):
    """One model trained with ``method``'s coupler and target; returns (model, seconds)."""
    coupler = SemidiscreteCoupler(potential) if method == "semidiscrete" else ExactOTCoupler()
    target = WeightedSampler(points, masses) if method == "minibatch-cells" else TensorSampler(points)
    torch.manual_seed(seed)  # model initialisation only: the same initial weights for both couplers
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed, progress=False,
                         threads=args.train_threads)
    trainer = Trainer(MLP(2), ConditionalFlowMatcher(coupler), gaussian_sampler((2,)), target, config)
    result = trainer.fit()
    return trainer.sampling_model.eval(), result.seconds


def measure(model, potential, points, seed: int, args) -> dict:
    """Field error per time and sample quality; the same evaluation draws for every model of a seed."""
    report = field_error(model, potential, TIMES, args.field_samples,
                         generator=torch.Generator().manual_seed(10_000 + seed))
    quality, tensors = evaluate_samples(model, gaussian_sampler((2,)), TensorSampler(points), n=args.eval_samples,
                                        euler_nfes=NFES, generator=torch.Generator().manual_seed(20_000 + seed))
    euler1 = sample(model, tensors["source"], solver="euler", steps=1).x
    return {"field_error": report.errors.tolist(), "w2": dict(quality.w2), "nfe": dict(quality.nfe),
            "npe": quality.npe, "w2_floor": quality.w2_floor,
            "samples": {"target": tensors["target"], "euler-1": euler1, "dopri5": tensors["generated"]}}


def mean_spread(values) -> tuple[float, float, float, float]:
    """mean, sample standard deviation (0 for one value), min, max."""
    v = torch.tensor(values, dtype=torch.float64)
    sd = v.std().item() if v.numel() > 1 else 0.0
    return v.mean().item(), sd, v.min().item(), v.max().item()


def fmt(values, digits: int = 3) -> str:
    m, sd, lo, hi = mean_spread(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def plot_field(path: Path, potential, traj: dict, resolution: int = 400, extent: float = 3.5) -> None:
    """Laguerre cells in the source plane (random colour per cell) with x0, and the straight paths
    x_t with the Euler states through the exact field on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = torch.linspace(-extent, extent, resolution, dtype=torch.float64)
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    cells = potential.assign(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), 0.0).reshape(resolution, resolution)
    colours = 0.35 + 0.65 * torch.rand(potential.n_support, 3, generator=torch.Generator().manual_seed(0))
    image = colours[cells].numpy()
    x0, target, states = traj["x0"], traj["target"], traj["trajectory"]
    support = potential.support

    fig, axes = plt.subplots(1, 2, figsize=(14, 7))
    ax = axes[0]
    ax.imshow(image, origin="lower", extent=(-extent, extent, -extent, extent), interpolation="nearest")
    ax.scatter(x0[:, 0], x0[:, 1], s=4, c="black", label="x0 ~ N(0, I)")
    ax.set_title(f"Laguerre cells of the fitted potential (N = {potential.n_support}), source plane")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.legend(loc="upper right", markerscale=3)
    ax = axes[1]
    ax.scatter(support[:, 0], support[:, 1], s=2, c="tab:green", alpha=0.4, label="target points y_j")
    for k in range(x0.shape[0]):
        ax.plot([x0[k, 0], target[k, 0]], [x0[k, 1], target[k, 1]], c="grey", lw=0.5, alpha=0.5)
    steps = states.shape[0] - 1
    ax.scatter(states[1:-1, :, 0].reshape(-1), states[1:-1, :, 1].reshape(-1), s=3, c="tab:orange",
               label=f"Euler states through ExactVelocityField ({steps} steps)")
    ax.scatter(x0[:, 0], x0[:, 1], s=4, c="black", label="x0")
    ax.scatter(states[-1, :, 0], states[-1, :, 1], s=14, facecolors="none", edgecolors="tab:red",
               label="Euler end point")
    ax.scatter(target[:, 0], target[:, 1], s=3, c="tab:blue", label="T(x0)")
    ax.set_title(f"straight paths (1-t) x0 + t T(x0) (grey); max |Euler end - T(x0)| = {traj['endpoint_error']:.1e}")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.legend(loc="lower left", markerscale=2, fontsize=8)
    axes[0].set_xlim(-extent, extent)
    axes[0].set_ylim(-extent, extent)
    both = torch.cat([x0.to(support.dtype), support])
    low, high = both.min(0).values - 0.2, both.max(0).values + 0.2
    axes[1].set_xlim(low[0].item(), high[0].item())
    axes[1].set_ylim(low[1].item(), high[1].item())
    for ax in axes:
        ax.set_aspect("equal")
    save_figure(fig, path, dpi=90)


def plot_errors(path: Path, runs: dict) -> None:
    """Field error against t (mean over seeds, min-max band), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for method in METHODS:
        colour = COLOURS[method]
        errors = torch.tensor([r["field_error"] for r in runs[method]], dtype=torch.float64)
        mean, lo, hi = errors.mean(0), errors.min(0).values, errors.max(0).values
        ax.plot(TIMES, mean, "o-", c=colour, label=f"{LABELS[method]} ({errors.shape[0]} seeds)")
        ax.fill_between(TIMES, lo, hi, color=colour, alpha=0.2)
    ax.axhline(1.0, c="grey", ls="--", lw=1, label="zero field")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("E|v - u|^2 / E|u|^2 on the OT path")
    ax.set_title("field error against the exact field (mean, min-max band over seeds)")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def plot_samples(path: Path, runs: dict, points) -> None:
    """Samples of the first seed: data, minibatch model, semidiscrete model, at Euler NFE 1 and dopri5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1 + len(METHODS), figsize=(4.5 * (1 + len(METHODS)), 9), sharex=True, sharey=True)
    for row, solver in zip(axes, ("euler-1", "dopri5")):
        data = runs["minibatch"][0]["samples"]["target"]
        row[0].scatter(data[:, 0], data[:, 1], s=2, alpha=0.5, c="tab:green")
        row[0].set_title(f"data (rows of the {points.shape[0]} points)")
        for ax, method in zip(row[1:], METHODS):
            colour = COLOURS[method]
            run = runs[method][0]
            x = run["samples"][solver]
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, c=colour)
            ax.set_title(f"{method}, {solver} (NFE {run['nfe'][solver]}): W2 {run['w2'][solver]:.3f}")
        for ax in row:
            ax.set_aspect("equal")
    for ax in axes[-1]:
        ax.set_xlabel("$x_1$")
    for ax in axes[:, 0]:
        ax.set_ylabel("$x_2$")
    save_figure(fig, path, dpi=90)


def to_markdown(args, argv, potential, mass_tv, traj, runs, exact_w2, seconds: dict) -> str:
    r = potential.fit_report
    command = "python examples/exact_field.py" + "".join(" " + shlex.quote(a) for a in argv)
    lines = ["# Exact OT-CFM field of an empirical target: minibatch against semidiscrete coupling", "",
             f"Command: `{command}`", "",
             f"Wall time: {seconds['total']:.0f} s in all (potential fit {r.seconds:.0f} s, training "
             f"{seconds['train']:.0f} s, measurements {seconds['measure']:.0f} s); "
             f"torch {torch.__version__}, {args.train_threads} torch thread(s) while training and measuring.", "",
             f"Target: {args.points} i.i.d. moons points (seed {args.data_seed}); source N(0, I). Training: ot-cfm MLP "
             f"(width 64), {args.steps} steps, batch {args.batch_size}, lr {args.lr}, seeds {args.seeds}; "
             "both couplers start from the same weights and draw the same noise, data and t.", "",
             "## Potential fit", "",
             "| method | TV cell-mass error (fresh samples) | TV noise | converged (tol) | iterations | seconds | "
             "cost lower bound | cost upper bound | map cost |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| {r.method} | {r.tv:.4f} | {r.tv_noise:.4f} | {r.converged} ({r.tol}) | {r.iterations} | "
             f"{r.seconds:.1f} | {r.cost_lower_bound:.4f} | {r.cost_upper_bound:.4f} | {r.map_cost:.4f} |", "",
             f"Cell masses of the fitted potential re-estimated on {args.mass_samples} fresh source samples: "
             f"TV to the uniform weights {mass_tv:.4f}. The exact field below is the OT field from N(0, I) to "
             "the points weighted by these masses; `minibatch-cells` trains minibatch OT-CFM on that same "
             "weighted measure, `minibatch` on uniform rows (the data as given).", "",
             f"Euler through `ExactVelocityField`, {args.euler_steps} steps, {traj['x0'].shape[0]} paths (float64): "
             f"max |x_1 - T(x0)| = {traj['endpoint_error']:.2e}.", "",
             "## Field error against the exact field", "",
             f"`field_error`: E|v(t, x_t) - u_t(x_t)|^2 / E|u_t|^2 on x_t = (1-t) x0 + t T(x0), {args.field_samples} "
             "source samples per seed (the zero field scores 1). Mean ± sample standard deviation over seeds.", "",
             "| coupler | " + " | ".join(f"t = {t}" for t in TIMES) + " | mean over t |",
             "| --- | " + " | ".join("---" for _ in TIMES) + " | --- |"]
    for method in METHODS:
        errors = [run["field_error"] for run in runs[method]]
        cells = [fmt([e[k] for e in errors], 4) for k in range(len(TIMES))]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {fmt([sum(e) / len(e) for e in errors], 4)} |")
    lines.append("")
    for other in ("minibatch", "minibatch-cells"):
        ratio = [sum(s["field_error"]) / sum(m["field_error"]) for s, m in zip(runs["semidiscrete"], runs[other])]
        lines.append(f"Ratio semidiscrete / {other} of the mean field error, per seed: "
                     + ", ".join(f"{x:.3f}" for x in ratio) + ".")
    lines += ["",
              "## Sample quality", "",
              f"W2 between {args.eval_samples} generated and {args.eval_samples} fresh rows of the points "
              "(same source and target draws for both models of a seed). Mean ± standard deviation over seeds.", "",
              "| model | " + " | ".join(f"W2 euler-{k}" for k in NFES) + " | W2 dopri5 | dopri5 NFE | NPE |",
              "| --- | " + " | ".join("---" for _ in NFES) + " | --- | --- | --- |"]
    labels = [f"euler-{k}" for k in NFES] + ["dopri5"]
    for method in METHODS:
        rs = runs[method]
        lines.append(f"| {method} | " + " | ".join(fmt([x["w2"][k] for x in rs]) for k in labels)
                     + f" | {fmt([x['nfe']['dopri5'] for x in rs], 0)} | {fmt([x['npe'] for x in rs])} |")
    lines.append("| exact field (Euler, T(x0) at any NFE) | " + " | ".join(fmt(exact_w2) for _ in NFES) + " | - | - | - |")
    floor = [x["w2_floor"] for x in runs["minibatch"]]
    lines += ["", f"W2 between two independent draws of {args.eval_samples} rows (noise floor): {fmt(floor)}.", "",
              "## Per seed", "", "| coupler | seed | train s | " + " | ".join(f"err t={t}" for t in TIMES)
              + " | " + " | ".join(f"W2 {k}" for k in labels) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in TIMES) + " | " + " | ".join("---" for _ in labels) + " |"]
    for method in METHODS:
        for seed, run in zip(args.seeds, runs[method]):
            lines.append(f"| {method} | {seed} | {run['seconds']:.1f} | "
                         + " | ".join(f"{e:.4f}" for e in run["field_error"]) + " | "
                         + " | ".join(f"{run['w2'][k]:.3f}" for k in labels) + " |")
    lines += ["", "Figures: `exact_field.png` (Laguerre cells, exact straight paths and Euler through the exact field), "
              "`exact_field_error.png` (field error against t), `exact_field_samples.png` (samples, first seed).", ""]
    return "\n".join(lines)


def run(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    points, potential = fit_potential(args)
    masses, mass_tv = cell_masses(potential, args.mass_samples, generator=args.data_seed + 2)
    r = potential.fit_report
    print(f"potential fit ({r.method}): TV {r.tv:.4f} (noise {r.tv_noise:.4f}, tol {r.tol}, converged {r.converged}), "
          f"{r.seconds:.1f} s, {r.iterations} iterations; OT cost in [{r.cost_lower_bound:.4f}, {r.cost_upper_bound:.4f}]",
          flush=True)
    print(f"cell masses of the fitted potential ({args.mass_samples} fresh samples): TV to uniform {mass_tv:.4f}")

    traj = exact_trajectories(potential, args.paths, args.euler_steps, seed=args.data_seed + 1)
    print(f"Euler ({args.euler_steps} steps) through the exact field: max |x_1 - T(x0)| = {traj['endpoint_error']:.2e}")
    plot_field(out / "exact_field.png", potential, traj)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.train_threads)
    runs, seconds = {m: [] for m in METHODS}, {"train": 0.0, "measure": 0.0}
    exact_w2 = []
    try:
        for seed in args.seeds:
            for method in METHODS:
                model, train_seconds = train(method, potential, points, masses, seed, args)
                seconds["train"] += train_seconds
                tic = time.perf_counter()
                result = measure(model, potential, points, seed, args)
                seconds["measure"] += time.perf_counter() - tic
                result["seconds"] = train_seconds
                runs[method].append(result)
                errors = ", ".join(f"{e:.4f}" for e in result["field_error"])
                w2 = ", ".join(f"{k} {v:.3f}" for k, v in result["w2"].items())
                print(f"seed {seed} {method}: train {train_seconds:.1f} s; field error [{errors}]; W2 {w2}", flush=True)
            quality, _ = evaluate_samples(ExactVelocityField(potential), gaussian_sampler((2,)), TensorSampler(points),
                                          n=args.eval_samples, euler_nfes=(1,), adaptive=False,
                                          generator=torch.Generator().manual_seed(20_000 + seed))
            exact_w2.append(quality.w2["euler-1"])
    finally:
        torch.set_num_threads(threads)

    plot_errors(out / "exact_field_error.png", runs)
    plot_samples(out / "exact_field_samples.png", runs, points)
    seconds["total"] = time.perf_counter() - start
    (out / "exact_field.md").write_text(to_markdown(args, argv, potential, mass_tv, traj, runs, exact_w2, seconds))
    print(f"wrote {out / 'exact_field.md'} and figures; {seconds['total']:.0f} s in all")
    return {"args": args, "points": points, "potential": potential, "trajectories": traj, "runs": runs,
            "exact_w2": exact_w2, "seconds": seconds, "out": out}


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
