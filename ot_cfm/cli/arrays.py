"""``ot-cfm train --data FILE`` on the rows (N, d) of a file, and ``ot-cfm sample`` of such runs (in the file's
units)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ot_cfm.cli.common import (
    METRICS_JSON,
    TOY_DEFAULTS,
    _conditioning,
    _coupler_record,
    _coupler_title,
    _finished_earlier,
    _image_only_options,
    _json_value,
    _make_coupler,
    _trained_on_other_rank,
)
from ot_cfm.evaluation.plotting import plot_points_2d
from ot_cfm.training.run_files import claim_run_folder
from ot_cfm.utils.atomic import atomic_write, save_torch
from ot_cfm.utils.parallelism import auto_threads, torch_threads


def _train_array(args) -> int:
    from ot_cfm.data import gaussian_sampler, load_array_dataset
    from ot_cfm.evaluation import evaluate_samples
    from ot_cfm.evaluation.plotting import plot_flow_2d
    from ot_cfm.matcher import ConditionalFlowMatcher
    from ot_cfm.models import MLP, guided_field
    from ot_cfm.training import CHECKPOINT_NAME, TrainConfig, Trainer

    clashing = [f"--{name}" for name in ("dataset", *TOY_DEFAULTS) if getattr(args, name) is not None]
    clashing += [flag for flag in _image_only_options(args) if flag not in ("--conditional", "--label-dropout",
                                                                             "--guidance")]
    if clashing:
        raise ValueError(f"--data trains on the rows of {args.data} (source N(0, I) in their dimension) and cannot "
                         f"be combined with {', '.join(clashing)}: drop them")
    data = load_array_dataset(args.data, labels=args.label_column, standardize=args.standardize, seed=args.seed)
    if args.conditional and data.num_classes is None:
        raise ValueError(f"--conditional needs labels: {args.data} has none; name the label column (.csv) or key "
                         "(.npz) with --label-column")
    guidance, label_dropout = _conditioning(args)
    num_classes = data.num_classes if args.conditional else None
    out = Path(args.out)
    torch.manual_seed(args.seed)  # model initialisation
    model = MLP(data.dim, width=args.width, depth=args.depth, activation=args.activation,
                time_embedding=args.time_embedding, num_classes=num_classes).to(args.device)
    matcher = ConditionalFlowMatcher(coupler=_make_coupler(args, args.conditional), sigma=args.sigma)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                         schedule=args.schedule, grad_clip=args.grad_clip, ema_warmup=not args.no_ema_warmup,
                         ema_decay=0.0 if args.ema_decay is None else args.ema_decay, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, out_dir=str(out), progress=not args.no_progress,
                         workers=args.workers, threads=args.threads, label_dropout=label_dropout,
                         precision=args.precision, coupling_mode=args.coupling_mode)
    meta = {"model": model.config, "data": data.name, "dim": data.dim, "conditional": args.conditional,
            "num_classes": data.num_classes, **_coupler_record(args),
            "mean": None if data.mean is None else data.mean.tolist(),
            "std": None if data.std is None else data.std.tolist()}
    source = gaussian_sampler((data.dim,))
    trainer = Trainer(model, matcher, source, data.train_sampler(labelled=args.conditional), config, metadata=meta)
    if _trained_on_other_rank(trainer, args):
        return 0
    with claim_run_folder(out, outputs=(METRICS_JSON,)):
        result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
        if _finished_earlier(result, out, args.steps):
            return 0
        sampling_model = trainer.sampling_model.eval()
        generator = torch.Generator().manual_seed(args.seed + 10_000)
        field = sampling_model
        if args.conditional:  # requested classes drawn like the held-out rows' labels
            rows = torch.randint(0, data.held_out.shape[0], (args.eval_samples,), generator=generator)
            field = guided_field(sampling_model, data.held_out_labels[rows].to(args.device), guidance)
        threads = args.threads or auto_threads(sampling_model, args.eval_samples, workers=0)
        with torch_threads(threads):
            quality, tensors = evaluate_samples(field, source, data.held_out_sampler(), n=args.eval_samples,
                                                generator=generator, device=args.device)
        metrics = {"data": data.name, "dim": data.dim, "standardized": args.standardize,
                   "conditional": args.conditional, **_coupler_record(args), "steps": result.step,
                   "batch_size": args.batch_size, "final_loss": result.loss,
                   "steps_this_call": result.steps_trained, "train_seconds_this_call": result.seconds,
                   "workers": result.workers, "threads": result.threads, "device": str(args.device),
                   "precision": args.precision, "train_rows": data.train.shape[0],
                   "held_out_rows": data.held_out.shape[0], "eval_samples": args.eval_samples,
                   "guidance": guidance if args.conditional else None, "label_dropout": label_dropout,
                   **quality.as_dict()}
        text = json.dumps(_json_value(metrics), indent=2, allow_nan=False) + "\n"
        atomic_write(out / METRICS_JSON, lambda f: f.write(text))
        trajectory = tensors.get("trajectory")
        figure = plot_flow_2d(out / "samples.png", *(_first_two(tensors[k]) for k in ("source", "generated", "target")),
                              None if trajectory is None else trajectory[..., :2],
                              title=f"{data.name} (held-out rows; coordinates 1-2{', standardised' * args.standardize})"
                                    f", {_coupler_title(args)}, {result.step} steps")
    print(quality.to_markdown().replace("two target samples", "two draws of the held-out rows"))
    print(f"wrote {out / CHECKPOINT_NAME}, {out / METRICS_JSON}, {figure}")
    return 0


def _first_two(x: torch.Tensor) -> torch.Tensor:
    """The first two coordinates of x (n, d) for a scatter; a zero second coordinate when d = 1."""
    return x[:, :2] if x.shape[1] >= 2 else torch.cat([x, torch.zeros_like(x)], dim=1)


def _sample_array_checkpoint(args, model, meta: dict) -> int:
    from ot_cfm.evaluation import model_device
    from ot_cfm.models import guided_field
    from ot_cfm.solvers.ode import sample

    conditional = bool(meta["conditional"])
    if args.guidance is not None and not conditional:
        raise ValueError(f"--guidance applies to class-conditional checkpoints; {args.checkpoint} is unconditional")
    x0 = torch.randn((args.n, meta["dim"]), generator=torch.Generator().manual_seed(args.seed))
    labels = torch.arange(args.n) % meta["num_classes"] if conditional else None
    device = model_device(model)  # the noise is drawn on the CPU and moved there
    field = model if labels is None else guided_field(model, labels.to(device),
                                                      1.0 if args.guidance is None else args.guidance)
    steps = None if args.solver in ("dopri5", "tsit5") else args.steps
    options = dict(solver=args.solver, steps=steps, **({"max_nfe": args.max_nfe} if steps is None else {}))
    with torch.no_grad():
        out = sample(field, x0.to(device), **options)
    x1 = out.x.cpu()
    if meta.get("mean") is not None:  # back to the file's units
        x1 = x1 * torch.tensor(meta["std"], dtype=x1.dtype) + torch.tensor(meta["mean"], dtype=x1.dtype)
    path = Path(args.out)
    save_torch(path.with_suffix(".pt"), {"x0": x0, "x1": x1, "labels": labels, "nfe": out.nfe})  # atomic, never through a link at that name
    plot_points_2d(path.with_suffix(".png"), _first_two(x1), labels,
             title=f"{Path(args.checkpoint).parent.name}: {meta['data']} samples (coordinates 1-2, the file's units), "
                   f"{args.solver}, NFE {out.nfe}")
    print(f"sampled {args.n} rows of dimension {meta['dim']} with {args.solver} (NFE {out.nfe}) in the units of "
          f"{meta['data']}; wrote {path.with_suffix('.pt')} and {path.with_suffix('.png')}")
    return 0
