"""``ot-cfm train`` and ``ot-cfm sample`` for the 2D toy pairs (``--source`` / ``--target``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ot_cfm.cli.common import (
    METRICS_JSON,
    _coupler_record,
    _coupler_title,
    _finished_earlier,
    _json_value,
    _make_coupler,
    _model_from_spec,
    _trained_on_other_rank,
)
from ot_cfm.training.run_files import claim_run_folder
from ot_cfm.utils.atomic import atomic_write, save_torch
from ot_cfm.utils.parallelism import auto_threads, torch_threads

PLOTTED_PATHS = 300       # trajectories drawn by `sample`'s 2D figure


def _train_toy(args) -> int:
    from ot_cfm.data import toy_sampler
    from ot_cfm.evaluation import evaluate_samples
    from ot_cfm.evaluation.plotting import plot_flow_2d
    from ot_cfm.matcher import ConditionalFlowMatcher
    from ot_cfm.training import CHECKPOINT_NAME, TrainConfig, Trainer

    out = Path(args.out)
    torch.manual_seed(args.seed)  # model initialisation
    spec = dict(dim=2, width=args.width, depth=args.depth, activation=args.activation,
                time_embedding=args.time_embedding)
    model = _model_from_spec(spec).to(args.device)  # initialised on the CPU: the same weights on every device
    matcher = ConditionalFlowMatcher(coupler=_make_coupler(args), sigma=args.sigma)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                         schedule=args.schedule, grad_clip=args.grad_clip, ema_warmup=not args.no_ema_warmup,
                         ema_decay=args.ema_decay, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, out_dir=str(out), progress=not args.no_progress,
                         workers=args.workers, threads=args.threads, precision=args.precision,
                         coupling_mode=args.coupling_mode)
    meta = {"model": spec, "source": args.source, "target": args.target, **_coupler_record(args)}
    source, target = toy_sampler(args.source), toy_sampler(args.target)
    trainer = Trainer(model, matcher, source, target, config, metadata=meta)
    if _trained_on_other_rank(trainer, args):
        return 0
    # the folder is held from the checkpoint's load to the figure, so no other run writes between
    with claim_run_folder(out, outputs=(METRICS_JSON,)):
        result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
        if _finished_earlier(result, out, args.steps):
            return 0

        threads = args.threads or auto_threads(trainer.sampling_model, args.eval_samples, workers=0)
        with torch_threads(threads):
            quality, tensors = evaluate_samples(trainer.sampling_model, source, target, n=args.eval_samples,
                                                generator=torch.Generator().manual_seed(args.seed + 10_000))
        metrics = {"source": args.source, "target": args.target, **_coupler_record(args), "steps": result.step,
                   "batch_size": args.batch_size, "world_size": result.world_size,
                   "coupling_mode": args.coupling_mode, "final_loss": result.loss,
                   "steps_this_call": result.steps_trained, "train_seconds_this_call": result.seconds,
                   "workers": result.workers, "threads": result.threads, "device": str(args.device),
                   "precision": args.precision, "eval_samples": args.eval_samples, **quality.as_dict()}
        text = json.dumps(_json_value(metrics), indent=2, allow_nan=False) + "\n"
        atomic_write(out / METRICS_JSON, lambda f: f.write(text))
        figure = plot_flow_2d(out / "samples.png", tensors["source"], tensors["generated"], tensors["target"],
                              tensors.get("trajectory"),
                              title=f"{args.source} -> {args.target}, {_coupler_title(args)}, {result.step} steps")
    print(quality.to_markdown())
    print(f"wrote {out / CHECKPOINT_NAME}, {out / METRICS_JSON}, {figure}")
    return 0


def _sample_toy_checkpoint(args, model, meta: dict) -> int:
    from ot_cfm.data import toy_sampler
    from ot_cfm.evaluation import model_device
    from ot_cfm.evaluation.plotting import plot_flow_2d
    from ot_cfm.solvers.ode import sample

    g = torch.Generator().manual_seed(args.seed)
    x0 = toy_sampler(meta["source"])(args.n, g)  # drawn on the CPU; sampled on the model's device
    steps = None if args.solver in ("dopri5", "tsit5") else args.steps
    options = dict(solver=args.solver, steps=steps, **({"max_nfe": args.max_nfe} if steps is None else {}))
    device = model_device(model)
    out = sample(model, x0.to(device), **options)  # the samples and their NFE: no stops at plotting times
    # The figure's paths, solved again for the points it draws; an adaptive solver also stops at their times.
    paths = sample(model, x0[:PLOTTED_PATHS].to(device), return_trajectory=True, **options)
    x1, trajectory = out.x.cpu(), paths.trajectory.cpu()
    path = Path(args.out)
    save_torch(path.with_suffix(".pt"), {"x0": x0, "x1": x1, "nfe": out.nfe})  # atomic, never through a link at that name
    plot_flow_2d(path.with_suffix(".png"), x0[:PLOTTED_PATHS], x1, toy_sampler(meta["target"])(args.n, g),
                 trajectory, max_paths=PLOTTED_PATHS,
                 title=f"{Path(args.checkpoint).parent.name}: {meta['source']} -> {meta['target']}, "
                       f"{args.solver}, NFE {out.nfe}")
    print(f"sampled {args.n} points with {args.solver} (NFE {out.nfe}); wrote {path.with_suffix('.pt')} "
          f"and {path.with_suffix('.png')}")
    return 0
