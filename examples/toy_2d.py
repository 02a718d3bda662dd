"""OT-CFM against I-CFM on a 2D toy pair: sample quality at few steps, path energy, and a figure.

Both models (ot-cfm's MLP, width 64) are trained with the same Trainer settings and seeds; only the
coupler differs: ``ExactOTCoupler`` (OT-CFM) or ``IndependentCoupler`` (I-CFM). Both are evaluated on
the same source and target samples: W2 at Euler NFE 1, 2, 4 and dopri5, and the normalised path
energy NPE = |E int |v|^2 dt - W2^2| / W2^2 of the dopri5 flow (0 for the optimal transport flow).

    python examples/toy_2d.py                         # 8gaussians -> moons, writes runs/toy_2d.png
    python examples/toy_2d.py --figure examples/results/toy_2d.png   # the committed figure
    python examples/toy_2d.py --source gaussian --target circles --steps 5000
    python examples/toy_2d.py --quick                 # smoke run, writes runs/toy_2d_quick.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.independent import IndependentCoupler
from ot_cfm.data import TOY_DATASETS, toy_sampler
from ot_cfm.evaluation import evaluate_samples
from ot_cfm.evaluation.plotting import draw_trajectories, save_figure
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import TrainConfig, Trainer

METHODS = {"OT-CFM": ExactOTCoupler, "I-CFM": IndependentCoupler}
NFES = (1, 2, 4)


def train_and_evaluate(coupler, source, target, args) -> tuple:
    """Train one model with ``coupler``; return its SampleQuality and plotting tensors."""
    torch.manual_seed(args.seed)  # model initialisation: the same initial weights for every method
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         progress=not args.no_progress)
    trainer = Trainer(MLP(2), ConditionalFlowMatcher(coupler), source, target, config)
    trainer.fit()
    return evaluate_samples(trainer.sampling_model.eval(), source, target, n=args.eval_samples, euler_nfes=NFES,
                            generator=torch.Generator().manual_seed(args.seed + 10_000))


def plot(path: Path, results: dict, title: str, max_paths: int = 300) -> None:
    """One row per method: generated (dopri5) against target samples, and the dopri5 trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 5 * len(results)), sharex=True, sharey=True,
                             squeeze=False)
    for row, (name, (quality, tensors)) in zip(axes, results.items()):
        target, generated = tensors["target"], tensors["generated"]
        paths = tensors["trajectory"][:, :max_paths]
        row[0].scatter(target[:, 0], target[:, 1], s=2, alpha=0.4, c="tab:green", label="target")
        row[0].scatter(generated[:, 0], generated[:, 1], s=2, alpha=0.4, c="tab:blue", label="generated")
        row[0].legend(loc="upper right", markerscale=4)
        row[0].set_title(f"{name}: samples (dopri5), W2 {quality.w2['dopri5']:.3f}, "
                         f"Euler-1 W2 {quality.w2['euler-1']:.3f}")
        draw_trajectories(row[1], paths, target=target)
        row[1].set_title(f"{name}: trajectories, NPE {quality.npe:.3f}")
        for ax in row:
            ax.set_aspect("equal")
    for ax in axes[-1]:
        ax.set_xlabel("$x_1$")
    for ax in axes[:, 0]:
        ax.set_ylabel("$x_2$")
    save_figure(fig, path, title=title, dpi=100)


def to_markdown(results: dict) -> str:
    labels = [f"euler-{k}" for k in NFES] + ["dopri5"]
    lines = ["| method | " + " | ".join(f"W2 {k}" for k in labels) + " | dopri5 NFE | NPE |",
             "| --- | " + " | ".join("---" for _ in labels) + " | --- | --- |"]
    for name, (q, _) in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{q.w2[k]:.3f}" for k in labels) + f" | {q.nfe['dopri5']} | {q.npe:.3f} |")
    floor = next(iter(results.values()))[0].w2_floor
    return "\n".join(lines) + f"\n\nW2 between two target samples of this size (floor): {floor:.3f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 300 steps of batch 128, 500 evaluation samples, figure runs/toy_2d_quick.png")
    p.add_argument("--source", choices=TOY_DATASETS, default="8gaussians")
    p.add_argument("--target", choices=TOY_DATASETS, default="moons")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--figure", type=Path, default=Path("runs/toy_2d.png"),
                   help="where the figure goes (the committed one: examples/results/toy_2d.png)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(argv=None) -> dict:
    """Train and evaluate both methods; returns {method: (SampleQuality, tensors)}."""
    parser = build_parser()
    if parser.parse_known_args(argv)[0].quick:  # new defaults: flags given explicitly still win
        parser.set_defaults(steps=300, batch_size=128, eval_samples=500, no_progress=True,
                            figure=Path("runs/toy_2d_quick.png"))
    args = parser.parse_args(argv)
    source, target = toy_sampler(args.source), toy_sampler(args.target)
    results = {name: train_and_evaluate(coupler(), source, target, args) for name, coupler in METHODS.items()}
    plot(args.figure, results, f"{args.source} -> {args.target}, {args.steps} steps, batch {args.batch_size}")
    print(to_markdown(results))
    print(f"figure: {args.figure}")
    return results


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
