"""``ot-cfm train --dataset`` on images (sample grids, image metrics), and ``ot-cfm sample`` of image runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ot_cfm.atomic import atomic_write
from ot_cfm.cli.common import METRICS_JSON, TOY_DEFAULTS, _conditioning, _finished_earlier, _json_value, _make_coupler, _model_device
from ot_cfm.parallelism import auto_threads, torch_threads
from ot_cfm.run_folder import claim_run_folder

IMAGE_EULER_NFES = (1, 2, 4, 8)
GRID_COLUMNS = 8          # images per row of a sample grid; unconditional grids are 8 x 8
GRID_NFE = 8              # Euler steps of the sample grids (fixed, so frames of one run are comparable)
GRIDS_FOLDER = "grids"    # grids during training: grids/step_XXXXXX.png
IMAGE_EMA_DECAY = 0.999   # --ema-decay of image runs when not given
EVAL_CHUNK = 500          # images sampled per model call during evaluation and sampling
PIXEL_W2_POINTS = 1000    # pixel W2: at most this many generated and held-out images
FID_SKIPPED = ("FID in Inception features skipped: no --inception-weights given. Give torch-fidelity's InceptionV3 "
               "FID weights (weights-inception-2015-12-05-6726825d.pth, a local file: nothing is downloaded) with "
               "--inception-weights PATH; needs pip install torch-fidelity")


def _image_field(model, labels: torch.Tensor | None, guidance: float):
    """The field to integrate: the model, or for labels its classifier-free guided field."""
    from ot_cfm.models import guided_field

    return model if labels is None else guided_field(model, labels, guidance)


def _sample_images(model, x0: torch.Tensor, labels: torch.Tensor | None, guidance: float, *, solver: str,
                   steps: int | None, **options):
    """Integrate x0 (N, C, H, W) in chunks of ``EVAL_CHUNK`` on the model's device; returns (images on the CPU,
    NFE). For an adaptive solver the NFE is the mean over the chunks (each chunk takes its own steps)."""
    from ot_cfm.sampling import sample

    device = _model_device(model)
    images, nfes = [], []
    for start in range(0, x0.shape[0], EVAL_CHUNK):
        chunk = slice(start, start + EVAL_CHUNK)
        field = _image_field(model, None if labels is None else labels[chunk].to(device), guidance)
        out = sample(field, x0[chunk].to(device), solver=solver, steps=steps, **options)
        images.append(out.x.cpu())
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
    guidance, label_dropout = _conditioning(args)
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
    model = model.to(args.device)  # initialised on the CPU: the same weights on every device
    coupler = _make_coupler(args.coupler, args.epsilon)
    if args.conditional:
        coupler = ClassConditionalCoupler(coupler)
    matcher = ConditionalFlowMatcher(coupler=coupler, sigma=args.sigma)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                         schedule=args.schedule, grad_clip=args.grad_clip, ema_decay=ema_decay, seed=args.seed,
                         eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, out_dir=str(out),
                         progress=not args.no_progress, workers=args.workers, threads=args.threads,
                         label_dropout=label_dropout, precision=args.precision)
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
        result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
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
                   "device": str(args.device), "precision": args.precision,
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
