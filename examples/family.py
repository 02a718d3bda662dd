"""The flow-matching family on 2D tasks: I-CFM, OT-CFM, SB-CFM, Target-CFM and VP-CFM, one model, equal training.

Each method is ot-cfm's matcher (a coupler + a probability path, ``ot_cfm.matcher``) training the same MLP
(width 64, depth 3, SELU: torchcfm's) with the same steps, batch, learning rate and seeds, on tasks from a
standard normal source N to a target (Tong et al., TMLR 2024, section 5.1). Reported per task and method,
mean ± std over seeds:

- W2 between generated and fresh target samples at Euler NFE 1, 2, 4, 8 and with dopri5 (with its NFE);
- the normalised path energy NPE = |E int |v|^2 dt - W2(x0, x1)^2| / W2(x0, x1)^2 of the dopri5 flow
  (0 for the optimal transport flow);
- the negative log-likelihood of held-out target points, by the instantaneous change of variables
  (``ot_cfm.solvers.likelihood.log_likelihood``, exact divergence) - meaningful for the straight and VP paths
  whose flow starts at N(0, I); SB-CFM's flow is the probability-flow ODE of its bridge.

    python examples/family.py                     # 3 tasks x 5 methods x 3 seeds, writes runs/family/
    python examples/family.py --out examples/results --figure-name family.png   # the committed results
    python examples/family.py --quick             # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.data import toy_sampler
from ot_cfm.evaluation import evaluate_samples
from ot_cfm.evaluation.plotting import save_figure
from ot_cfm.matcher import (
    ConditionalFlowMatcher,
    SchrodingerBridgeConditionalFlowMatcher,
    TargetConditionalFlowMatcher,
    VariancePreservingConditionalFlowMatcher,
)
from ot_cfm.models import MLP
from ot_cfm.solvers.likelihood import log_likelihood
from ot_cfm.training import TrainConfig, Trainer
from ot_cfm.utils.atomic import atomic_write

#: task -> (source, target) toy names
TASKS = {"N -> 8gaussians": ("gaussian", "8gaussians"), "N -> moons": ("gaussian", "moons"),
         "N -> scurve": ("gaussian", "scurve")}
EULER_NFES = (1, 2, 4, 8)


def matchers(sigma: float, sb_sigma: float) -> dict:
    """method name -> a function building its matcher (fresh per run)."""
    return {
        "I-CFM": lambda: ConditionalFlowMatcher(sigma=sigma),
        "OT-CFM": lambda: ConditionalFlowMatcher(ExactOTCoupler(), sigma=sigma),
        "SB-CFM": lambda: SchrodingerBridgeConditionalFlowMatcher(sigma=sb_sigma),
        "Target-CFM": lambda: TargetConditionalFlowMatcher(sigma=sigma),
        "VP-CFM": lambda: VariancePreservingConditionalFlowMatcher(sigma=sigma),
    }


def run_one(task: str, method: str, seed: int, args) -> dict:
    """Train one model (or resume it from its checkpoint) and evaluate it; a dict of metrics (W2 per solver,
    dopri5 NFE, NPE, NLL, training seconds). Each run lives in its own folder under ``args.out / "runs"``
    (checkpoint and ``result.json``, written atomically), so an interrupted study resumes where it stopped."""
    folder = args.out / "runs" / task.replace(" -> ", "_to_") / method / f"seed{seed}"
    settings = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "sigma", "sb_sigma", "eval_samples",
                                              "nll_samples")}
    cached = folder / "result.json"
    if cached.exists():
        result = json.loads(cached.read_text())
        if result.get("settings") == settings:
            return result["metrics"]
    source, target = (toy_sampler(name) for name in TASKS[task])
    torch.manual_seed(seed)  # the model's initial weights: equal for every method at this seed
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed, workers=0, threads=1,
                         progress=False, out_dir=str(folder), checkpoint_every=args.steps)
    trainer = Trainer(MLP(2), matchers(args.sigma, args.sb_sigma)[method](), source, target, config)
    start = time.perf_counter()
    trainer.fit(resume=True)
    seconds = time.perf_counter() - start
    model = trainer.sampling_model.eval()
    quality, _ = evaluate_samples(model, source, target, n=args.eval_samples, euler_nfes=EULER_NFES,
                                  generator=torch.Generator().manual_seed(10_000 + seed))
    held_out = target(args.nll_samples, torch.Generator().manual_seed(20_000 + seed))
    nll = -float(log_likelihood(model, held_out).log_likelihood.mean())
    metrics = {"task": task, "method": method, "seed": seed, "seconds": seconds,
               **{f"w2 {k}": v for k, v in quality.w2.items()}, "nfe dopri5": quality.nfe["dopri5"], "npe": quality.npe,
               "nll": nll, "w2 floor": quality.w2_floor}
    atomic_write(cached, lambda f: json.dump({"settings": settings, "metrics": metrics}, f, indent=1))
    return metrics


def _mean_std(values: list[float], digits: int = 3) -> str:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def to_markdown(rows: list[dict], args, seconds: float) -> str:
    solvers = [f"euler-{k}" for k in EULER_NFES] + ["dopri5"]
    lines = ["# The flow-matching family on 2D tasks", "",
             f"Command: `{' '.join(['python examples/family.py', *args.argv])}`", "",
             f"{args.steps} steps, batch {args.batch_size}, lr {args.lr}, MLP width 64 depth 3 (SELU), seeds "
             f"{', '.join(str(s) for s in range(args.seeds))}; sigma {args.sigma} (SB-CFM: {args.sb_sigma}, Sinkhorn "
             f"epsilon 2 sigma^2). Mean ± std over seeds. W2 on {args.eval_samples} generated against as many fresh target "
             f"points; NLL on {args.nll_samples} held-out target points (nats). Training time summed over the runs "
             f"{sum(r['seconds'] for r in rows):.0f} s; wall time of this invocation {seconds:.0f} s (runs finished "
             "earlier are read from their folders).", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        floor = [r["w2 floor"] for r in rows if r["task"] == task]
        lines += [f"## {task}", "", f"W2 between two target samples of this size (floor): {_mean_std(floor)}", "",
                  "| method | " + " | ".join(f"W2 {s}" for s in solvers) + " | dopri5 NFE | NPE | NLL |",
                  "| --- |" + " --- |" * (len(solvers) + 3)]
        for method in dict.fromkeys(r["method"] for r in rows):
            group = [r for r in rows if r["task"] == task and r["method"] == method]
            if group:
                cells = [_mean_std([r[f"w2 {s}"] for r in group]) for s in solvers]
                cells += [_mean_std([r["nfe dopri5"] for r in group], 0), _mean_std([r["npe"] for r in group]),
                          _mean_std([r["nll"] for r in group], 2)]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """One panel per task: W2 against NFE (Euler, log scale) per method, mean with min-max bars; dopri5 as a star
    at its mean NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for k, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            group = [r for r in rows if r["task"] == task and r["method"] == method]
            w2 = torch.tensor([[r[f"w2 euler-{n}"] for n in EULER_NFES] for r in group])
            mean = w2.mean(0)
            ax.errorbar(EULER_NFES, mean, yerr=[mean - w2.min(0).values, w2.max(0).values - mean], marker="o", ms=3,
                        capsize=2, color=f"C{k}", label=method)
            ax.plot([sum(r["nfe dopri5"] for r in group) / len(group)],
                    [sum(r["w2 dopri5"] for r in group) / len(group)], "*", ms=9, color=f"C{k}")
        ax.set_xscale("log")
        ax.set_xlabel("function evaluations (Euler: o, dopri5: *)")
        ax.set_ylabel("W2 to the target")
        ax.set_title(task)
        ax.legend(fontsize=8)
    save_figure(fig, path, title="The flow-matching family: sample quality against integration cost "
                                 "(mean over seeds, bars min-max)", dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="examples/family.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 task, 1 seed, 100 steps, 300 evaluation points")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--methods", nargs="+", choices=list(matchers(0.1, 1.0)), default=list(matchers(0.1, 1.0)))
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sigma", type=float, default=0.1, help="path noise of I-, OT-, Target- and VP-CFM (default 0.1)")
    p.add_argument("--sb-sigma", type=float, default=0.5, help="SB-CFM's bridge diffusion (default 0.5)")
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--nll-samples", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("runs/family"), help="folder for family.md and the figure")
    p.add_argument("--figure-name", default="family.png")
    return p


def run(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if parser.parse_known_args(argv)[0].quick:  # new defaults: flags given explicitly still win
        parser.set_defaults(tasks=["N -> moons"], seeds=1, steps=100, eval_samples=300, nll_samples=100,
                            out=Path("runs/family_quick"))
    args = parser.parse_args(argv)
    args.argv = argv
    start, rows = time.perf_counter(), []
    for task in args.tasks:
        for method in args.methods:
            for seed in range(args.seeds):
                rows.append(run_one(task, method, seed, args))
                r = rows[-1]
                print(f"{task:16s} {method:10s} seed {seed}: W2 euler-1 {r['w2 euler-1']:.3f}, dopri5 {r['w2 dopri5']:.3f} "
                      f"(NFE {r['nfe dopri5']}), NPE {r['npe']:.3f}, NLL {r['nll']:.2f}, {r['seconds']:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    text = to_markdown(rows, args, seconds)
    atomic_write(args.out / "family.md", lambda f: f.write(text))
    plot(rows, args.out / args.figure_name)
    print(text)
    print(f"wrote {args.out / 'family.md'} and {args.out / args.figure_name}")
    return rows


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
