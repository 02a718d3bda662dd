"""Schrodinger-bridge CFM approaches OT-CFM as sigma -> 0: the coupling, and trained models on a 2D task.

Part 1, the coupling alone (no training): on batches of N(0, I) and moons, SB-CFM's Sinkhorn plan with
epsilon = 2 sigma^2 (absolute) against the exact OT permutation of the same batch: the share of drawn pairs
that are the exact OT pairs, and the plan's transport cost sum_ij P_ij |x0_i - x1_j|^2 over the OT cost (1 for
exact OT, above 1 for any other plan).

Part 2, trained models: OT-CFM (ExactOTCoupler, sigma = 0, an MLP) and SB-CFM (Sinkhorn with 2 sigma^2 and
the Brownian bridge, a FlowAndScore of two MLPs) with the same Trainer settings and seed, evaluated on the
same held-out points: W2 of ODE samples (Euler with 1 and 4 steps, dopri5), the path energy
PE = E int |v|^2 dt of the dopri5 flow and its normalised form NPE = |PE - W2^2| / W2^2 (W2 between the source
and target points; 0 for the OT flow), and for SB-CFM the W2 of SDE samples dx = [v + sigma^2 / 2 s] dt + sigma dW
(Euler-Maruyama, 100 steps).

    python examples/sb_cfm_sigma.py                  # gaussian -> moons, about 2 minutes on 2 CPU cores
    python examples/sb_cfm_sigma.py --quick          # smoke run, seconds
    python examples/sb_cfm_sigma.py --json runs/sb_cfm_sigma.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.sinkhorn import SinkhornCoupler
from ot_cfm.data import TOY_DATASETS, toy_sampler
from ot_cfm.evaluation import evaluate_samples
from ot_cfm.evaluation.metrics import path_energy, wasserstein2
from ot_cfm.matcher import OTConditionalFlowMatcher, SchrodingerBridgeConditionalFlowMatcher
from ot_cfm.models import MLP, FlowAndScore
from ot_cfm.solvers.sde import sample_sde
from ot_cfm.training import TrainConfig, Trainer
from ot_cfm.utils.atomic import atomic_write

NFES = (1, 4)


def coupling_study(source, target, sigmas, batch_size: int, batches: int, seed: int) -> list[dict]:
    """Per sigma: mean over ``batches`` batches of the share of SB pairs equal to the exact OT pairs and of the
    Sinkhorn plan's cost over the OT cost; Sinkhorn runs to its tolerance (up to 50,000 iterations)."""
    g = torch.Generator().manual_seed(seed)
    data = [(source(batch_size, g).double(), target(batch_size, g).double()) for _ in range(batches)]
    exact = [ExactOTCoupler().pair(x0, x1)[1] for x0, x1 in data]
    rows = []
    for sigma in sigmas:
        coupler = SinkhornCoupler(epsilon=2 * sigma**2, relative=False, max_iters=50_000)
        same, ratio, iters = [], [], []
        for (x0, x1), ot_x1 in zip(data, exact):
            iters.append(coupler.solve(x0, x1).n_iters)
            _, sb_x1 = coupler.pair(x0, x1, generator=g)
            same.append(float((sb_x1 == ot_x1).all(1).double().mean()))
            plan_cost = (coupler.plan(x0, x1) * torch.cdist(x0, x1).square()).sum()
            ratio.append(float(plan_cost / (ot_x1 - x0).square().sum(1).mean()))
        rows.append(dict(sigma=sigma, same_pairs=sum(same) / batches, cost_ratio=sum(ratio) / batches,
                         sinkhorn_iters=sum(iters) / batches))
    return rows


def train_and_evaluate(sigma: float | None, source, target, args) -> dict:
    """Train OT-CFM (sigma None) or SB-CFM(sigma) and evaluate it; returns a row of the results table."""
    torch.manual_seed(args.seed)  # model initialisation: the same flow network for every method
    flow = MLP(2)
    if sigma is None:
        model, matcher = flow, OTConditionalFlowMatcher()
    else:
        model, matcher = FlowAndScore(flow, MLP(2)), SchrodingerBridgeConditionalFlowMatcher(sigma)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, progress=False, workers=0)
    start = time.perf_counter()
    Trainer(model, matcher, source, target, config).fit()
    seconds = time.perf_counter() - start
    model.eval()
    quality, tensors = evaluate_samples(model, source, target, n=args.eval_samples, euler_nfes=NFES,
                                        generator=torch.Generator().manual_seed(args.seed + 10_000))
    trajectory = tensors["trajectory"]
    energy = path_energy(trajectory, torch.linspace(0.0, 1.0, trajectory.shape[0], dtype=trajectory.dtype))
    row = dict(method="OT-CFM" if sigma is None else f"SB-CFM sigma={sigma}", sigma=sigma,
               w2={k: round(v, 4) for k, v in quality.w2.items()}, dopri5_nfe=quality.nfe["dopri5"],
               path_energy=round(energy, 4), npe=round(quality.npe, 4), w2_floor=round(quality.w2_floor, 4),
               w2_squared_source_target=round(wasserstein2(tensors["source"], tensors["target"]) ** 2, 4),
               train_seconds=round(seconds, 1))
    if sigma is not None:
        with torch.no_grad():
            out = sample_sde(model, model.score, tensors["source"], sigma=sigma, steps=100,
                             generator=torch.Generator().manual_seed(args.seed + 20_000))
        row["w2_sde"] = round(wasserstein2(out.x, tensors["target"]), 4)
    return row


def to_markdown(coupling: list[dict], trained: list[dict], args) -> str:
    lines = [f"Coupling, {args.coupling_batches} batches of {args.batch_size} ({args.source} -> {args.target}):", "",
             "| sigma | epsilon = 2 sigma^2 | exact OT pairs | plan cost / OT cost | Sinkhorn iterations |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['sigma']} | {2 * r['sigma'] ** 2:.4g} | {r['same_pairs']:.3f} | {r['cost_ratio']:.3f} | "
              f"{r['sinkhorn_iters']:.0f} |" for r in coupling]
    labels = [f"euler-{k}" for k in NFES] + ["dopri5"]
    lines += ["", f"Trained, {args.steps} steps of batch {args.batch_size}, seed {args.seed}, {args.eval_samples} "
              "evaluation points:", "",
              "| method | " + " | ".join(f"W2 {k}" for k in labels) + " | W2 SDE | PE | NPE | dopri5 NFE | train s |",
              "| --- | " + " | ".join("---" for _ in labels) + " | --- | --- | --- | --- | --- |"]
    for r in trained:
        sde = f"{r['w2_sde']:.3f}" if "w2_sde" in r else "-"
        lines.append(f"| {r['method']} | " + " | ".join(f"{r['w2'][k]:.3f}" for k in labels)
                     + f" | {sde} | {r['path_energy']:.3f} | {r['npe']:.3f} | {r['dopri5_nfe']} | {r['train_seconds']} |")
    lines.append(f"\nW2^2 between the source and target points (the OT flow's path energy): "
                 f"{trained[0]['w2_squared_source_target']:.3f}; W2 between two target samples of this size (floor): "
                 f"{trained[0]['w2_floor']:.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 100 steps, 2 trained sigmas, 300 evaluation points")
    p.add_argument("--source", choices=TOY_DATASETS, default="gaussian")
    p.add_argument("--target", choices=TOY_DATASETS, default="moons")
    p.add_argument("--sigmas", type=float, nargs="+", default=[2.0, 1.0, 0.5], help="SB-CFM sigmas to train")
    p.add_argument("--coupling-sigmas", type=float, nargs="+", default=[2.0, 1.0, 0.5, 0.25, 0.1, 0.05],
                   help="sigmas of the coupling study (no training; small sigmas need many Sinkhorn iterations)")
    p.add_argument("--coupling-batches", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    return p


def run(argv=None) -> dict:
    """Run both parts; returns {"coupling": [...], "trained": [...]} and prints the tables."""
    parser = build_parser()
    if parser.parse_known_args(argv)[0].quick:  # new defaults: flags given explicitly still win
        parser.set_defaults(steps=100, sigmas=[1.0, 0.5], coupling_sigmas=[1.0, 0.25], coupling_batches=1,
                            eval_samples=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    source, target = toy_sampler(args.source), toy_sampler(args.target)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an unconverged Sinkhorn plan would make the study wrong
        coupling = coupling_study(source, target, args.coupling_sigmas, args.batch_size, args.coupling_batches,
                                  args.seed)
    trained = [train_and_evaluate(sigma, source, target, args) for sigma in [None, *args.sigmas]]
    print(to_markdown(coupling, trained, args))
    results = {"coupling": coupling, "trained": trained, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.json is not None:
        atomic_write(args.json, lambda f: json.dump(results, f, indent=2))
    return results


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
