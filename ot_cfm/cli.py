"""The ``ot-cfm`` command line: train, sample, and the experiments (manifold, batch-size)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ot_cfm.atomic import atomic_write
from ot_cfm.checkpoint import read_checkpoint
from ot_cfm.parallelism import auto_threads, torch_threads
from ot_cfm.run_folder import claim_run_folder

__all__ = ["main", "build_parser"]

COUPLERS = ("exact", "sinkhorn", "independent")
METRICS_JSON = "metrics.json"
# Commands whose options belong to an experiment module: everything after the name is handed over.
EXPERIMENTS = {
    ("manifold",): ("manifold_tests.experiment", "terminal normal hyperbolicity of exact, learned and empirical fields"),
    ("experiment", "batch-size"): ("ot_cfm_experiments.batch_size",
                                   "how minibatch OT-CFM approaches population OT-CFM as the batch grows"),
}


def _make_coupler(name: str, epsilon: float):
    from ot_cfm.couplers.exact import ExactOTCoupler
    from ot_cfm.couplers.independent import IndependentCoupler
    from ot_cfm.couplers.sinkhorn import SinkhornCoupler

    return {"exact": ExactOTCoupler, "independent": IndependentCoupler,
            "sinkhorn": lambda: SinkhornCoupler(epsilon=epsilon)}[name]()


def _model_from_spec(spec: dict):
    from ot_cfm.models import MLP

    return MLP(**spec)


def _load_sampling_model(checkpoint: Path):
    state = read_checkpoint(checkpoint)  # refuses files that would run code, names the file on any fault
    meta = state["metadata"]
    missing = [k for k in ("model", "source", "target") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{checkpoint} lacks {missing} in its metadata (the model's description and the data's "
                         "names); was it written by `ot-cfm train`?")
    model = _model_from_spec(meta["model"])
    if state.get("ema") is not None:  # AveragedModel's state: "module.<name>" entries plus a counter
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    else:
        weights = state["model"]
    model.load_state_dict(weights)
    return model.eval(), meta


def _json_value(value):
    """``value`` with every non-finite float replaced by None, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _read_metrics(path: Path) -> dict | None:
    """The metrics written by an earlier call, or None when there are none or they are not strict JSON."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    try:
        return json.loads(path.read_text(), parse_constant=refuse)
    except (OSError, ValueError):
        return None


def cmd_train(args) -> int:
    from ot_cfm.data import toy_sampler
    from ot_cfm.evaluation import evaluate_samples
    from ot_cfm.matcher import ConditionalFlowMatcher
    from ot_cfm.plotting import plot_flow_2d
    from ot_cfm.trainer import CHECKPOINT_NAME, TrainConfig, Trainer

    out = Path(args.out)
    torch.manual_seed(args.seed)  # model initialisation
    spec = dict(dim=2, width=args.width, depth=args.depth, activation=args.activation,
                time_embedding=args.time_embedding)
    model = _model_from_spec(spec)
    matcher = ConditionalFlowMatcher(coupler=_make_coupler(args.coupler, args.epsilon), sigma=args.sigma)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                         schedule=args.schedule, grad_clip=args.grad_clip, ema_decay=args.ema_decay, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, out_dir=str(out), progress=not args.no_progress,
                         workers=args.workers, threads=args.threads)
    meta = {"model": spec, "source": args.source, "target": args.target, "coupler": args.coupler}
    source, target = toy_sampler(args.source), toy_sampler(args.target)
    trainer = Trainer(model, matcher, source, target, config, metadata=meta)
    # the folder is held from the checkpoint's load to the figure, so no other run writes between
    with claim_run_folder(out, outputs=(METRICS_JSON,)):
        result = trainer.fit(resume=args.resume)
        if result.steps_trained == 0:
            print(f"the run in {out} had already finished at step {result.step} (--steps {args.steps}): "
                  f"nothing to train")
            if _read_metrics(out / METRICS_JSON) is not None:
                print(f"its metrics are in {out / METRICS_JSON}")
                return 0
        else:
            print(f"trained {result.steps_trained} steps (to step {result.step}) in {result.seconds:.1f} s with "
                  f"{_count(result.workers, 'worker')} and {_count(result.threads, 'torch thread')}; "
                  f"final loss {result.loss:.4f}")

        threads = args.threads or auto_threads(trainer.sampling_model, args.eval_samples, workers=0)
        with torch_threads(threads):
            quality, tensors = evaluate_samples(trainer.sampling_model, source, target, n=args.eval_samples,
                                                generator=torch.Generator().manual_seed(args.seed + 10_000))
        metrics = {"source": args.source, "target": args.target, "coupler": args.coupler, "steps": result.step,
                   "batch_size": args.batch_size, "final_loss": result.loss,
                   "steps_this_call": result.steps_trained, "train_seconds_this_call": result.seconds,
                   "workers": result.workers, "threads": result.threads,
                   "eval_samples": args.eval_samples, **quality.as_dict()}
        text = json.dumps(_json_value(metrics), indent=2, allow_nan=False) + "\n"
        atomic_write(out / METRICS_JSON, lambda f: f.write(text))
        figure = plot_flow_2d(out / "samples.png", tensors["source"], tensors["generated"], tensors["target"],
                              tensors.get("trajectory"),
                              title=f"{args.source} -> {args.target}, {args.coupler} coupler, {result.step} steps")
    print(quality.to_markdown())
    print(f"wrote {out / CHECKPOINT_NAME}, {out / METRICS_JSON}, {figure}")
    return 0


def cmd_sample(args) -> int:
    from ot_cfm.data import toy_sampler
    from ot_cfm.plotting import plot_flow_2d
    from ot_cfm.sampling import sample

    model, meta = _load_sampling_model(Path(args.checkpoint))
    torch.set_num_threads(args.threads or auto_threads(model, args.n, workers=0))  # this process is ours
    g = torch.Generator().manual_seed(args.seed)
    x0 = toy_sampler(meta["source"])(args.n, g)
    steps = None if args.solver in ("dopri5", "tsit5") else args.steps
    out = sample(model, x0, solver=args.solver, steps=steps, return_trajectory=True,
                 **({"max_nfe": args.max_nfe} if steps is None else {}))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x0": x0, "x1": out.x, "nfe": out.nfe}, path.with_suffix(".pt"))
    plot_flow_2d(path.with_suffix(".png"), x0, out.x, toy_sampler(meta["target"])(args.n, g), out.trajectory,
                 title=f"{args.solver}, NFE {out.nfe}")
    print(f"sampled {args.n} points with {args.solver} (NFE {out.nfe}); wrote {path.with_suffix('.pt')} "
          f"and {path.with_suffix('.png')}")
    return 0


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 0, got {text!r}")


def _threads(text: str) -> int | None:
    if text == "auto":
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from ot_cfm.data import TOY_DATASETS
    from ot_cfm.models import ACTIVATIONS

    parser = argparse.ArgumentParser(prog="ot-cfm", description="Minibatch OT conditional flow matching.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a 2D toy flow, evaluate W2 at several NFE, save a figure",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--source", choices=TOY_DATASETS, default="8gaussians", help="source distribution")
    train.add_argument("--target", choices=TOY_DATASETS, default="moons", help="target distribution")
    train.add_argument("--coupler", choices=COUPLERS, default="exact", help="minibatch coupling")
    train.add_argument("--epsilon", type=float, default=0.05, help="Sinkhorn regularisation (relative to the mean cost)")
    train.add_argument("--sigma", type=float, default=0.0, help="path noise of the matcher")
    train.add_argument("--steps", type=int, default=5000, help="optimisation steps")
    train.add_argument("--batch-size", type=int, default=256, help="points per batch")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    train.add_argument("--warmup", type=int, default=0, help="linear lr warm-up steps")
    train.add_argument("--schedule", choices=("constant", "cosine"), default="cosine",
                       help="lr schedule after the warm-up (cosine: to 0 at --steps, so --resume cannot extend it)")
    train.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    train.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights for sampling (0: off)")
    train.add_argument("--width", type=int, default=64, help="MLP hidden width")
    train.add_argument("--depth", type=int, default=3, help="MLP hidden layers")
    train.add_argument("--activation", choices=ACTIVATIONS, default="selu",
                       help="MLP activation")
    train.add_argument("--time-embedding", choices=("concat", "sinusoidal"), default="concat",
                       help="how t enters the MLP")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights, batches and t draws")
    train.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    train.add_argument("--workers", type=_workers, default="auto", metavar="{auto,N}",
                       help="processes that draw and couple batches ahead of the model step (0: none; auto: for "
                            "the exact coupler on 2 or more cores, cores - 1 but at least 2 and at most 8, else 0; "
                            "the weights do not depend on it)")
    train.add_argument("--threads", type=_threads, default="auto", metavar="{auto,N}",
                       help="torch threads of the training process (auto: 1 for small models, else the cores the "
                            "workers leave)")
    train.add_argument("--eval-samples", type=int, default=2000, help="samples for the final W2 and NPE")
    train.add_argument("--out", default="runs/default", help="output folder")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    smp = sub.add_parser("sample", help="sample from a checkpoint written by `ot-cfm train`",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    smp.add_argument("checkpoint", help="checkpoint.pt written by `ot-cfm train`")
    smp.add_argument("--n", type=int, default=2000, help="samples to draw")
    smp.add_argument("--solver", choices=("euler", "midpoint", "rk4", "dopri5", "tsit5"), default="dopri5")
    smp.add_argument("--steps", type=int, default=8, help="steps of fixed-step solvers")
    smp.add_argument("--max-nfe", type=int, default=10_000,
                     help="adaptive solvers stop with an error after this many field evaluations")
    smp.add_argument("--seed", type=int, default=0, help="seed of the source draws")
    smp.add_argument("--threads", type=_threads, default="auto", metavar="{auto,N}",
                     help="torch threads (auto: 1 for small models, else all cores)")
    smp.add_argument("--out", default="runs/samples", help="output path without suffix (.pt and .png written)")
    smp.set_defaults(func=cmd_sample)

    sub.add_parser("manifold", help=EXPERIMENTS[("manifold",)][1] + " (options: ot-cfm manifold --help)")
    experiment = sub.add_parser("experiment", help="run an experiment (ot-cfm experiment batch-size --help)")
    experiment.add_argument("name", choices=["batch-size"])
    return parser


def _run_experiment(argv: list[str]) -> int | None:
    """Hand ``argv`` to an experiment module's ``main`` if it names one; None otherwise."""
    import importlib

    for words, (module, _) in EXPERIMENTS.items():
        if tuple(argv[:len(words)]) == words:
            return importlib.import_module(module).main(argv[len(words):], prog="ot-cfm " + " ".join(words))
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    delegated = _run_experiment(argv)
    if delegated is not None:
        return delegated
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as err:
        print(f"ot-cfm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
