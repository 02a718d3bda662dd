"""The ``ot-cfm`` command line: train, sample, and the experiments (manifold, batch-size).

``ot-cfm train`` trains on a 2D toy pair (``--source``/``--target``), with ``--data`` on the rows (N, d) of
a .npy / .npz / .csv file (source N(0, I) in d dimensions; optionally class-conditional) or, with
``--dataset``, on images (source N(0, I) of the image shape; optionally class-conditional), evaluates
the sampling weights at several NFE (``--data``: against its held-out rows) and writes a checkpoint,
``metrics.json`` and a figure (a scatter or a sample grid). ``ot-cfm sample`` draws from such a
checkpoint (``--data`` runs: in the file's units, undoing ``--standardize``).
"""

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
TOY_DEFAULTS = {"source": "8gaussians", "target": "moons"}
IMAGE_EULER_NFES = (1, 2, 4, 8)
GRID_COLUMNS = 8          # images per row of a sample grid; unconditional grids are 8 x 8
GRID_NFE = 8              # Euler steps of the sample grids (fixed, so frames of one run are comparable)
GRIDS_FOLDER = "grids"    # grids during training: grids/step_XXXXXX.png
IMAGE_EMA_DECAY = 0.999   # --ema-decay of image runs when not given
EVAL_CHUNK = 500          # images sampled per model call during evaluation and sampling
PLOTTED_PATHS = 300       # trajectories drawn by `sample`'s 2D figure
PIXEL_W2_POINTS = 1000    # pixel W2: at most this many generated and held-out images
FID_SKIPPED = ("FID in Inception features skipped: no --inception-weights given. Give torch-fidelity's InceptionV3 "
               "FID weights (weights-inception-2015-12-05-6726825d.pth, a local file: nothing is downloaded) with "
               "--inception-weights PATH; needs pip install torch-fidelity")
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
    """The model a checkpoint describes: ``model.config`` (with ``kind``), or a toy MLP's arguments (older
    toy checkpoints have no ``kind``)."""
    from ot_cfm.models import MLP, model_from_config

    return model_from_config(spec) if "kind" in spec else MLP(**spec)


def _load_sampling_model(checkpoint: Path):
    state = read_checkpoint(checkpoint)  # refuses files that would run code, names the file on any fault
    meta = state["metadata"]
    images = isinstance(meta, dict) and "dataset" in meta
    arrays = isinstance(meta, dict) and "data" in meta
    needed = (("model", "dataset", "shape", "conditional") if images else
              ("model", "data", "dim", "conditional", "mean", "std") if arrays else ("model", "source", "target"))
    missing = [k for k in needed if not isinstance(meta, dict) or k not in meta]
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


def _image_only_options(args) -> list[str]:
    """The image options given to a toy run."""
    given = [("--model unet", args.model == "unet"), ("--conditional", args.conditional),
             ("--label-dropout", args.label_dropout is not None), ("--guidance", args.guidance is not None),
             ("--data-dir", args.data_dir is not None), ("--eval-every", args.eval_every != 0),
             ("--classifier-steps", args.classifier_steps is not None),
             ("--inception-weights", args.inception_weights is not None)]
    return [flag for flag, present in given if present]


def _finished_earlier(result, out: Path, steps: int) -> bool:
    """Print what ``fit`` did; True when the run had finished before this call and its metrics are valid
    (nothing left to do), False when it trained or its metrics must be written again."""
    if result.steps_trained:
        print(f"trained {result.steps_trained} steps (to step {result.step}) in {result.seconds:.1f} s with "
              f"{_count(result.workers, 'worker')} and {_count(result.threads, 'torch thread')}; "
              f"final loss {result.loss:.4f}")
        return False
    print(f"the run in {out} had already finished at step {result.step} (--steps {steps}): nothing to train")
    if _read_metrics(out / METRICS_JSON) is None:
        return False
    print(f"its metrics are in {out / METRICS_JSON}")
    return True


def _array_only_options(args) -> list[str]:
    """The options of --data runs given to another run."""
    return [flag for flag, present in (("--label-column", args.label_column is not None),
                                       ("--standardize", args.standardize)) if present]


def cmd_train(args) -> int:
    if args.data is not None:
        return _train_array(args)
    array_only = _array_only_options(args)
    if array_only:
        raise ValueError(f"only --data runs take {', '.join(array_only)}: add --data FILE or drop them")
    if args.dataset is not None:
        return _train_images(args)
    image_only = _image_only_options(args)
    if image_only:
        raise ValueError(f"{', '.join(image_only)} apply to image runs only; add --dataset "
                         "{digits,mnist,cifar10,npy,folder} (or --data FILE: it takes --conditional, --label-dropout "
                         "and --guidance) or drop them for a toy run")
    for name, default in TOY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.ema_decay is None:
        args.ema_decay = 0.0
    return _train_toy(args)


def _train_toy(args) -> int:
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
        if _finished_earlier(result, out, args.steps):
            return 0

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


# ---------------------------------------------------------------- rows (N, d) of a file

def _train_array(args) -> int:
    from ot_cfm.couplers.conditional import ClassConditionalCoupler
    from ot_cfm.data import gaussian_sampler, load_array_dataset
    from ot_cfm.evaluation import evaluate_samples
    from ot_cfm.matcher import ConditionalFlowMatcher
    from ot_cfm.models import MLP, guided_field
    from ot_cfm.plotting import plot_flow_2d
    from ot_cfm.trainer import CHECKPOINT_NAME, TrainConfig, Trainer

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
    guidance = 1.0 if args.guidance is None else args.guidance
    if not math.isfinite(guidance):
        raise ValueError(f"--guidance must be a finite number, got {guidance}")
    if not args.conditional and (args.label_dropout or guidance != 1.0):
        raise ValueError("--label-dropout and --guidance apply to class-conditional runs: add --conditional")
    label_dropout = (0.1 if args.conditional else 0.0) if args.label_dropout is None else args.label_dropout
    num_classes = data.num_classes if args.conditional else None
    out = Path(args.out)
    torch.manual_seed(args.seed)  # model initialisation
    model = MLP(data.dim, width=args.width, depth=args.depth, activation=args.activation,
                time_embedding=args.time_embedding, num_classes=num_classes)
    coupler = _make_coupler(args.coupler, args.epsilon)
    if args.conditional:
        coupler = ClassConditionalCoupler(coupler)
    matcher = ConditionalFlowMatcher(coupler=coupler, sigma=args.sigma)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                         schedule=args.schedule, grad_clip=args.grad_clip,
                         ema_decay=0.0 if args.ema_decay is None else args.ema_decay, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, out_dir=str(out), progress=not args.no_progress,
                         workers=args.workers, threads=args.threads, label_dropout=label_dropout)
    meta = {"model": model.config, "data": data.name, "dim": data.dim, "conditional": args.conditional,
            "num_classes": data.num_classes, "coupler": args.coupler,
            "mean": None if data.mean is None else data.mean.tolist(),
            "std": None if data.std is None else data.std.tolist()}
    source = gaussian_sampler((data.dim,))
    trainer = Trainer(model, matcher, source, data.train_sampler(labelled=args.conditional), config, metadata=meta)
    with claim_run_folder(out, outputs=(METRICS_JSON,)):
        result = trainer.fit(resume=args.resume)
        if _finished_earlier(result, out, args.steps):
            return 0
        sampling_model = trainer.sampling_model.eval()
        generator = torch.Generator().manual_seed(args.seed + 10_000)
        field = sampling_model
        if args.conditional:  # requested classes drawn like the held-out rows' labels
            rows = torch.randint(0, data.held_out.shape[0], (args.eval_samples,), generator=generator)
            field = guided_field(sampling_model, data.held_out_labels[rows], guidance)
        threads = args.threads or auto_threads(sampling_model, args.eval_samples, workers=0)
        with torch_threads(threads):
            quality, tensors = evaluate_samples(field, source, data.held_out_sampler(), n=args.eval_samples,
                                                generator=generator)
        metrics = {"data": data.name, "dim": data.dim, "standardized": args.standardize,
                   "conditional": args.conditional, "coupler": args.coupler, "steps": result.step,
                   "batch_size": args.batch_size, "final_loss": result.loss,
                   "steps_this_call": result.steps_trained, "train_seconds_this_call": result.seconds,
                   "workers": result.workers, "threads": result.threads, "train_rows": data.train.shape[0],
                   "held_out_rows": data.held_out.shape[0], "eval_samples": args.eval_samples,
                   "guidance": guidance if args.conditional else None, "label_dropout": label_dropout,
                   **quality.as_dict()}
        text = json.dumps(_json_value(metrics), indent=2, allow_nan=False) + "\n"
        atomic_write(out / METRICS_JSON, lambda f: f.write(text))
        trajectory = tensors.get("trajectory")
        figure = plot_flow_2d(out / "samples.png", *(_first_two(tensors[k]) for k in ("source", "generated", "target")),
                              None if trajectory is None else trajectory[..., :2],
                              title=f"{data.name} (held-out rows; coordinates 1-2{', standardised' * args.standardize})"
                                    f", {args.coupler} coupler, {result.step} steps")
    print(quality.to_markdown().replace("two target samples", "two draws of the held-out rows"))
    print(f"wrote {out / CHECKPOINT_NAME}, {out / METRICS_JSON}, {figure}")
    return 0


def _first_two(x: torch.Tensor) -> torch.Tensor:
    """The first two coordinates of x (n, d) for a scatter; a zero second coordinate when d = 1."""
    return x[:, :2] if x.shape[1] >= 2 else torch.cat([x, torch.zeros_like(x)], dim=1)


def _scatter(path: Path, points: torch.Tensor, labels: torch.Tensor | None, *, title: str) -> Path:
    """Save a PNG scatter of points (n, 2), coloured by class when labels (n,) are given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    p = points.detach().cpu()
    ax.scatter(p[:, 0], p[:, 1], s=3, alpha=0.5, c=None if labels is None else labels.cpu(),
               cmap=None if labels is None else "tab10")
    ax.set_xlabel("coordinate 1")
    ax.set_ylabel("coordinate 2")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sample_array_checkpoint(args, model, meta: dict) -> int:
    from ot_cfm.models import guided_field
    from ot_cfm.sampling import sample

    conditional = bool(meta["conditional"])
    if args.guidance is not None and not conditional:
        raise ValueError(f"--guidance applies to class-conditional checkpoints; {args.checkpoint} is unconditional")
    x0 = torch.randn((args.n, meta["dim"]), generator=torch.Generator().manual_seed(args.seed))
    labels = torch.arange(args.n) % meta["num_classes"] if conditional else None
    field = model if labels is None else guided_field(model, labels, 1.0 if args.guidance is None else args.guidance)
    steps = None if args.solver in ("dopri5", "tsit5") else args.steps
    options = dict(solver=args.solver, steps=steps, **({"max_nfe": args.max_nfe} if steps is None else {}))
    with torch.no_grad():
        out = sample(field, x0, **options)
    x1 = out.x
    if meta.get("mean") is not None:  # back to the file's units
        x1 = x1 * torch.tensor(meta["std"], dtype=x1.dtype) + torch.tensor(meta["mean"], dtype=x1.dtype)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x0": x0, "x1": x1, "labels": labels, "nfe": out.nfe}, path.with_suffix(".pt"))
    _scatter(path.with_suffix(".png"), _first_two(x1), labels,
             title=f"{Path(args.checkpoint).parent.name}: {meta['data']} samples (coordinates 1-2, the file's units), "
                   f"{args.solver}, NFE {out.nfe}")
    print(f"sampled {args.n} rows of dimension {meta['dim']} with {args.solver} (NFE {out.nfe}) in the units of "
          f"{meta['data']}; wrote {path.with_suffix('.pt')} and {path.with_suffix('.png')}")
    return 0


# ---------------------------------------------------------------- images

def _image_field(model, labels: torch.Tensor | None, guidance: float):
    """The field to integrate: the model, or for labels its classifier-free guided field."""
    from ot_cfm.models import guided_field

    return model if labels is None else guided_field(model, labels, guidance)


def _sample_images(model, x0: torch.Tensor, labels: torch.Tensor | None, guidance: float, *, solver: str,
                   steps: int | None, **options):
    """Integrate x0 (N, C, H, W) in chunks of ``EVAL_CHUNK``; returns (images, NFE). For an adaptive solver
    the NFE is the mean over the chunks (each chunk takes its own steps)."""
    from ot_cfm.sampling import sample

    images, nfes = [], []
    for start in range(0, x0.shape[0], EVAL_CHUNK):
        chunk = slice(start, start + EVAL_CHUNK)
        field = _image_field(model, None if labels is None else labels[chunk], guidance)
        out = sample(field, x0[chunk], solver=solver, steps=steps, **options)
        images.append(out.x)
        nfes.append(out.nfe)
    return torch.cat(images), sum(nfes) / len(nfes)


def _grid_noise(shape: tuple, num_classes: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed noise of a run's sample grids (and, when conditional, the labels: one row per class)."""
    rows = GRID_COLUMNS if num_classes is None else num_classes
    x0 = torch.randn((rows * GRID_COLUMNS, *shape), generator=torch.Generator().manual_seed(seed + 20_000))
    labels = None if num_classes is None else torch.arange(num_classes).repeat_interleave(GRID_COLUMNS)
    return x0, labels


def _write_grid(path: Path, model, shape: tuple, num_classes: int | None, class_names, guidance: float, seed: int,
                title: str) -> Path:
    """Sample the run's grid noise with Euler (``GRID_NFE`` steps) and save it as a PNG, one row per class when
    conditional."""
    from ot_cfm.plotting import plot_image_grid

    x0, labels = _grid_noise(shape, num_classes, seed)
    with torch.no_grad():
        images, nfe = _sample_images(model, x0, labels, guidance, solver="euler", steps=GRID_NFE)
    rows = None if num_classes is None else [class_names[k] for k in range(num_classes)]
    suffix = "" if num_classes is None else f", guidance {guidance:g}, one row per class"
    return plot_image_grid(path, images, columns=GRID_COLUMNS, row_labels=rows,
                           title=f"{title}, Euler NFE {nfe:g}{suffix}")


def _evaluate_images(model, data, classifier, *, n: int, conditional: bool, guidance: float, seed: int,
                     adaptive: bool = True, euler_nfes=IMAGE_EULER_NFES,
                     inception_weights: str | None = None) -> tuple[dict, list[dict]]:
    """Image metrics of ``model`` at each solver setting, on fixed noise (``seed``) against the held-out images.

    Returns (metrics keyed "<metric>/<solver>", table rows). Conditional samples request the labels
    arange(K) repeated, and their classifier accuracy is reported. With ``inception_weights`` the FID in
    InceptionV3 features is added ("fid/<solver>").
    """
    from ot_cfm import image_metrics
    from ot_cfm.image_metrics import evaluate_images
    from ot_cfm.metrics import wasserstein2
    from ot_cfm.sampling import IntegrationError

    x0 = torch.randn((n, *data.shape), generator=torch.Generator().manual_seed(seed + 10_000))
    labels = torch.arange(n) % data.num_classes if conditional else None
    held_out = data.held_out_images
    metrics, rows = {}, []
    settings = [(f"euler-{k}", "euler", k) for k in euler_nfes] + ([("dopri5", "dopri5", None)] if adaptive else [])
    for name, solver, steps in settings:
        options = {"max_nfe": 1000} if steps is None else {}
        try:
            with torch.no_grad():
                images, nfe = _sample_images(model, x0, labels, guidance, solver=solver, steps=steps, **options)
        except IntegrationError as err:  # an undertrained field can stiffen the adaptive solver: say so, go on
            print(f"{name}: no samples ({err}); its metrics are null")
            metrics.update({f"frechet_distance/{name}": None, f"nfe/{name}": None})
            continue
        quality = evaluate_images(images, held_out, classifier, requested_labels=labels)
        w2 = wasserstein2(images[:PIXEL_W2_POINTS], held_out[:PIXEL_W2_POINTS])
        row = {"nfe": float(nfe), "w2": w2, **quality.as_dict()}
        if inception_weights is not None:
            row["fid"] = image_metrics.inception_fid(images, held_out, inception_weights=inception_weights).value
        metrics.update({f"{k}/{name}": v for k, v in row.items()})
        rows.append({"solver": name, **row})
    return metrics, rows


def _image_table(rows: list[dict]) -> str:
    conditional = any("conditional_accuracy" in r for r in rows)
    fid = any("fid" in r for r in rows)
    head = "| solver | NFE | Fréchet distance | pixel W2 | coverage entropy | least class share |"
    lines = [head + (" conditional accuracy |" if conditional else "") + (" FID |" if fid else ""),
             "|" + " --- |" * (6 + conditional + fid)]
    for r in rows:
        line = (f"| {r['solver']} | {r['nfe']:g} | {r['frechet_distance']:.3f} | {r['w2']:.3f} | "
                f"{r['coverage_entropy']:.3f} | {r['least_frequent_share']:.3f} |")
        line += f" {r['conditional_accuracy']:.3f} |" if conditional else ""
        lines.append(line + (f" {r['fid']:.3f} |" if fid else ""))
    return "\n".join(lines)


def _train_images(args) -> int:
    from ot_cfm.couplers.conditional import ClassConditionalCoupler
    from ot_cfm.data import gaussian_sampler
    from ot_cfm.image_data import load_image_dataset
    from ot_cfm.image_metrics import ClassifierConfig, classifier_accuracy, load_or_train_classifier
    from ot_cfm.matcher import ConditionalFlowMatcher
    from ot_cfm.models import MLP, unet_for
    from ot_cfm.trainer import CHECKPOINT_NAME, TrainConfig, Trainer

    toy = [f"--{name}" for name in TOY_DEFAULTS if getattr(args, name) is not None]
    if toy:
        raise ValueError(f"{' and '.join(toy)} choose the 2D toy distributions and cannot be combined with "
                         f"--dataset {args.dataset}: an image run's source is N(0, I) of the image shape; drop "
                         f"{' and '.join(toy)}")
    guidance = 1.0 if args.guidance is None else args.guidance
    if not math.isfinite(guidance):
        raise ValueError(f"--guidance must be a finite number, got {guidance}")
    if not args.conditional and (args.label_dropout or guidance != 1.0):
        raise ValueError("--label-dropout and --guidance apply to class-conditional runs: add --conditional")
    label_dropout = (0.1 if args.conditional else 0.0) if args.label_dropout is None else args.label_dropout
    ema_decay = IMAGE_EMA_DECAY if args.ema_decay is None else args.ema_decay
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        raise ValueError(f"--inception-weights {args.inception_weights}: no such file; expected torch-fidelity's "
                         "InceptionV3 FID weights (weights-inception-2015-12-05-6726825d.pth); nothing is downloaded")
    out = Path(args.out)
    data = load_image_dataset(args.dataset, root=args.data_dir)
    num_classes = data.num_classes if args.conditional else None
    torch.manual_seed(args.seed)  # model initialisation
    if (args.model or "unet") == "unet":
        model = unet_for(data.shape, num_classes=num_classes)
    else:
        model = MLP(math.prod(data.shape), width=args.width, depth=args.depth, activation=args.activation,
                    time_embedding=args.time_embedding, num_classes=num_classes)
    coupler = _make_coupler(args.coupler, args.epsilon)
    if args.conditional:
        coupler = ClassConditionalCoupler(coupler)
    matcher = ConditionalFlowMatcher(coupler=coupler, sigma=args.sigma)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                         schedule=args.schedule, grad_clip=args.grad_clip, ema_decay=ema_decay, seed=args.seed,
                         eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, out_dir=str(out),
                         progress=not args.no_progress, workers=args.workers, threads=args.threads,
                         label_dropout=label_dropout)
    meta = {"model": model.config, "dataset": data.name, "shape": list(data.shape), "conditional": args.conditional,
            "num_classes": data.num_classes, "class_names": list(data.class_names), "coupler": args.coupler}
    classifier_config = ClassifierConfig(**({} if args.classifier_steps is None else {"steps": args.classifier_steps}))
    classifier = load_or_train_classifier(data.train_images, data.train_labels, num_classes=data.num_classes,
                                          config=classifier_config)
    run = f"{out.name}: {data.name}, {'conditional, ' if args.conditional else ''}{args.coupler} coupler"

    def grid_during_training(sampling_model, step: int) -> dict:
        """Every --eval-every steps: the grid, and the image metrics at Euler NFE ``GRID_NFE`` for the log."""
        _write_grid(out / GRIDS_FOLDER / f"step_{step:06d}.png", sampling_model, data.shape, num_classes,
                    data.class_names, guidance, args.seed, f"{run}, step {step}")
        quality, _ = _evaluate_images(sampling_model, data, classifier, n=args.eval_samples,
                                      conditional=args.conditional, guidance=guidance, seed=args.seed,
                                      adaptive=False, euler_nfes=(GRID_NFE,))
        return quality

    trainer = Trainer(model, matcher, gaussian_sampler(data.shape), data.train_sampler(labelled=args.conditional),
                      config, evaluate=grid_during_training if args.eval_every else None, metadata=meta)
    with claim_run_folder(out, outputs=(METRICS_JSON,)):
        result = trainer.fit(resume=args.resume)
        if _finished_earlier(result, out, args.steps):
            return 0
        sampling_model = trainer.sampling_model.eval()
        threads = args.threads or auto_threads(sampling_model, min(args.eval_samples, EVAL_CHUNK), workers=0)
        with torch_threads(threads):
            quality, rows = _evaluate_images(sampling_model, data, classifier, n=args.eval_samples,
                                             conditional=args.conditional, guidance=guidance, seed=args.seed,
                                             inception_weights=args.inception_weights)
            figure = _write_grid(out / "samples.png", sampling_model, data.shape, num_classes, data.class_names,
                                 guidance, args.seed, f"{run}, step {result.step}")
        metrics = {"dataset": data.name, "shape": list(data.shape), "model": model.config["kind"],
                   "conditional": args.conditional, "coupler": args.coupler, "steps": result.step,
                   "batch_size": args.batch_size, "final_loss": result.loss, "steps_this_call": result.steps_trained,
                   "train_seconds_this_call": result.seconds, "workers": result.workers, "threads": result.threads,
                   "eval_samples": args.eval_samples, "held_out_images": data.held_out_images.shape[0],
                   "guidance": guidance if args.conditional else None, "label_dropout": label_dropout,
                   "ema_decay": ema_decay, "classifier_steps": classifier_config.steps,
                   "classifier_held_out_accuracy": classifier_accuracy(classifier, data.held_out_images,
                                                                       data.held_out_labels),
                   **quality}
        text = json.dumps(_json_value(metrics), indent=2, allow_nan=False) + "\n"
        atomic_write(out / METRICS_JSON, lambda f: f.write(text))
    print(_image_table(rows))
    print(f"classifier accuracy on held-out images: {metrics['classifier_held_out_accuracy']:.3f} (Fréchet distances "
          "are in its feature space)")
    if args.inception_weights is None and data.shape[0] == 3:
        print(FID_SKIPPED)
    print(f"wrote {out / CHECKPOINT_NAME}, {out / METRICS_JSON}, {figure}")
    return 0


def _class_rows(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, list[int]]:
    """Up to ``GRID_COLUMNS`` images of each class, one row per class (as many per row as the rarest class has)."""
    per_class = [torch.nonzero(labels == k).flatten() for k in range(num_classes)]
    columns = min(GRID_COLUMNS, *(len(i) for i in per_class))
    if columns == 0:
        raise ValueError(f"a grid with one row per class needs --n >= {num_classes} (the number of classes)")
    return torch.cat([images[i[:columns]] for i in per_class]), columns


def _sample_image_checkpoint(args, model, meta: dict) -> int:
    from ot_cfm.plotting import plot_image_grid

    shape, conditional = tuple(meta["shape"]), bool(meta["conditional"])
    if args.guidance is not None and not conditional:
        raise ValueError(f"--guidance applies to class-conditional checkpoints; {args.checkpoint} is unconditional")
    guidance = 1.0 if args.guidance is None else args.guidance
    x0 = torch.randn((args.n, *shape), generator=torch.Generator().manual_seed(args.seed))
    labels = torch.arange(args.n) % meta["num_classes"] if conditional else None
    steps = None if args.solver in ("dopri5", "tsit5") else args.steps
    with torch.no_grad():
        images, nfe = _sample_images(model, x0, labels, guidance, solver=args.solver, steps=steps,
                                     **({"max_nfe": args.max_nfe} if steps is None else {}))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x0": x0, "x1": images, "labels": labels, "nfe": nfe}, path.with_suffix(".pt"))
    title = f"{Path(args.checkpoint).parent.name}: {meta['dataset']}, {args.solver}, NFE {nfe:g}"
    if conditional:
        names = meta.get("class_names") or [str(k) for k in range(meta["num_classes"])]
        grid, columns = _class_rows(images, labels, meta["num_classes"])
        plot_image_grid(path.with_suffix(".png"), grid, columns=columns, row_labels=names,
                        title=f"{title}, guidance {guidance:g}, one row per class")
    else:
        plot_image_grid(path.with_suffix(".png"), images[:GRID_COLUMNS ** 2], columns=GRID_COLUMNS, title=title)
    print(f"sampled {args.n} images with {args.solver} (NFE {nfe:g}); wrote {path.with_suffix('.pt')} "
          f"and {path.with_suffix('.png')}")
    return 0


def cmd_sample(args) -> int:
    from ot_cfm.data import toy_sampler
    from ot_cfm.plotting import plot_flow_2d
    from ot_cfm.sampling import sample

    model, meta = _load_sampling_model(Path(args.checkpoint))
    if "dataset" in meta:
        torch.set_num_threads(args.threads or auto_threads(model, min(args.n, EVAL_CHUNK), workers=0))
        return _sample_image_checkpoint(args, model, meta)
    if "data" in meta:
        torch.set_num_threads(args.threads or auto_threads(model, args.n, workers=0))
        return _sample_array_checkpoint(args, model, meta)
    if args.guidance is not None:
        raise ValueError(f"--guidance applies to class-conditional image checkpoints; {args.checkpoint} is a toy run")
    torch.set_num_threads(args.threads or auto_threads(model, args.n, workers=0))  # this process is ours
    g = torch.Generator().manual_seed(args.seed)
    x0 = toy_sampler(meta["source"])(args.n, g)
    steps = None if args.solver in ("dopri5", "tsit5") else args.steps
    options = dict(solver=args.solver, steps=steps, **({"max_nfe": args.max_nfe} if steps is None else {}))
    out = sample(model, x0, **options)  # the samples and their NFE: no stops at plotting times
    # The figure's paths, solved again for the points it draws; an adaptive solver also stops at their times.
    paths = sample(model, x0[:PLOTTED_PATHS], return_trajectory=True, **options)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x0": x0, "x1": out.x, "nfe": out.nfe}, path.with_suffix(".pt"))
    plot_flow_2d(path.with_suffix(".png"), x0[:PLOTTED_PATHS], out.x, toy_sampler(meta["target"])(args.n, g),
                 paths.trajectory, max_paths=PLOTTED_PATHS,
                 title=f"{Path(args.checkpoint).parent.name}: {meta['source']} -> {meta['target']}, "
                       f"{args.solver}, NFE {out.nfe}")
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


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None: those options say in their help what not giving them means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from ot_cfm.data import TOY_DATASETS
    from ot_cfm.image_data import IMAGE_DATASETS
    from ot_cfm.models import ACTIVATIONS

    parser = argparse.ArgumentParser(prog="ot-cfm", description="Minibatch OT conditional flow matching.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a 2D toy flow or, with --dataset, an image flow; evaluate at several "
                                         "NFE, save a figure", formatter_class=_HelpWithDefaults)
    train.add_argument("--source", choices=TOY_DATASETS, default=None,
                       help=f"source distribution of a toy run ({TOY_DEFAULTS['source']} when not given)")
    train.add_argument("--target", choices=TOY_DATASETS, default=None,
                       help=f"target distribution of a toy run ({TOY_DEFAULTS['target']} when not given)")
    train.add_argument("--dataset", choices=IMAGE_DATASETS, default=None,
                       help="train on images instead of the toy pair (source: N(0, I) of the image shape); digits "
                            "ship with scikit-learn, the others are read from --data-dir (nothing is downloaded)")
    train.add_argument("--data", default=None, metavar="FILE",
                       help="train on the rows (N, d) of a .npy, .npz or .csv file (source: N(0, I) in d dimensions); "
                            "a seeded fifth of the rows is held out for the W2 / NPE table")
    train.add_argument("--label-column", default=None, metavar="NAME_OR_INDEX",
                       help="--data: the labels, a CSV column (header name or index; removed from the features) or "
                            "an .npz key (y or labels are found without it); needed by --conditional")
    train.add_argument("--standardize", action="store_true",
                       help="--data: train on columns scaled to mean 0 and std 1; samples are mapped back to the "
                            "file's units")
    train.add_argument("--data-dir", default=None,
                       help="folder of MNIST IDX files / CIFAR-10 batches / class subfolders, or the .npy/.npz file")
    train.add_argument("--model", choices=("unet", "mlp"), default=None,
                       help="image runs: the UNet preset for the image size (default), or an MLP on flattened "
                            "pixels (--width, --depth; sensible for 8x8 digits only); toy runs: mlp")
    train.add_argument("--conditional", action="store_true",
                       help="image and --data runs: class-conditional model, labelled batches coupled within classes "
                            "(image runs: label dropout for classifier-free guidance; grids get one row per class)")
    train.add_argument("--label-dropout", type=float, default=None,
                       help="conditional runs: probability of training on the null label (0.1 when not given)")
    train.add_argument("--guidance", type=float, default=None,
                       help="conditional runs: classifier-free guidance scale of the evaluation and grids (1.0 when "
                            "not given: the conditional field; 0: the unconditional one)")
    train.add_argument("--eval-every", type=int, default=0,
                       help="image runs: every this many steps write a sample grid of the fixed grid noise to "
                            "grids/step_XXXXXX.png and log the image metrics at Euler NFE 8 to metrics.jsonl (0: only "
                            "samples.png and metrics.json at the end)")
    train.add_argument("--inception-weights", default=None, metavar="PATH",
                       help="image runs: torch-fidelity's InceptionV3 FID weights file; adds the FID at each solver "
                            "setting (needs torch-fidelity; for RGB data such as CIFAR-10)")
    train.add_argument("--classifier-steps", type=int, default=None,
                       help="image runs: training steps of the feature classifier of the image metrics (1000 when "
                            "not given; cached by content hash in $OT_CFM_CLASSIFIER_CACHE or "
                            "~/.cache/ot-cfm/classifiers)")
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
    train.add_argument("--ema-decay", type=float, default=None,
                       help=f"EMA of the weights for sampling (0: off; when not given 0 for toy runs, "
                            f"{IMAGE_EMA_DECAY} for image runs)")
    train.add_argument("--width", type=int, default=64, help="MLP hidden width (image runs: with --model mlp)")
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
    train.add_argument("--eval-samples", type=int, default=2000,
                       help="samples of the final evaluation (toy: W2 and NPE; images: Fréchet distance, pixel W2, "
                            "class coverage and conditional accuracy)")
    train.add_argument("--out", default="runs/default", help="output folder")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    smp = sub.add_parser("sample", help="sample from a checkpoint written by `ot-cfm train`",
                         formatter_class=_HelpWithDefaults)
    smp.add_argument("checkpoint", help="checkpoint.pt written by `ot-cfm train`")
    smp.add_argument("--n", type=int, default=2000, help="samples to draw")
    smp.add_argument("--solver", choices=("euler", "midpoint", "rk4", "dopri5", "tsit5"), default="dopri5")
    smp.add_argument("--steps", type=int, default=8, help="steps of fixed-step solvers")
    smp.add_argument("--max-nfe", type=int, default=10_000,
                     help="adaptive solvers stop with an error after this many field evaluations")
    smp.add_argument("--seed", type=int, default=0, help="seed of the source draws")
    smp.add_argument("--guidance", type=float, default=None,
                     help="class-conditional image checkpoints: classifier-free guidance scale (1.0 when not given); "
                          "the samples ask for the classes 0, 1, ..., K-1, 0, 1, ... in turn")
    smp.add_argument("--threads", type=_threads, default="auto", metavar="{auto,N}",
                     help="torch threads (auto: 1 for small models, else all cores)")
    smp.add_argument("--out", default="runs/samples",
                     help="output path without suffix (.pt and .png written: a scatter for toy runs, a sample grid "
                          "for image runs)")
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
