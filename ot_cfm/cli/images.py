"""``ot-cfm train --dataset`` on images (sample grids, image metrics), and ``ot-cfm sample`` of image runs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ot_cfm.cli.common import (
    METRICS_JSON,
    TOY_DEFAULTS,
    _conditioning,
    _coupler_record,
    _coupler_title,
    _finished_earlier,
    _json_value,
    _make_coupler,
    _trained_on_other_rank,
)
from ot_cfm.images.sampling import (
    EVAL_CHUNK,
    GRID_COLUMNS,
    GRID_NFE,
    evaluate_image_model,
    plan_evaluation,
    sample_images,
    write_sample_grid,
)
from ot_cfm.training.run_files import claim_run_folder
from ot_cfm.utils.atomic import atomic_write, save_torch
from ot_cfm.utils.parallelism import auto_threads, torch_threads

GRIDS_FOLDER = "grids"    # grids during training: grids/step_XXXXXX.png
IMAGE_EMA_DECAY = 0.999   # --ema-decay of image runs when not given (warmed up: ot_cfm.training.ema)
_GRID_EVAL_SAMPLES = 500  # samples of the --eval-every evaluations when the final one is off (--no-eval)
FID_SKIPPED = ("FID in Inception features skipped: no --inception-weights given. Give torch-fidelity's InceptionV3 "
               "FID weights (weights-inception-2015-12-05-6726825d.pth, a local file: nothing is downloaded) with "
               "--inception-weights PATH; needs pip install torch-fidelity")


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
    from ot_cfm.data import gaussian_sampler
    from ot_cfm.images import (
        ClassifierConfig,
        classifier_accuracy,
        classifier_cache_path,
        load_image_dataset,
        load_or_train_classifier,
    )
    from ot_cfm.matcher import ConditionalFlowMatcher
    from ot_cfm.models import MLP, unet_for
    from ot_cfm.training import CHECKPOINT_NAME, TrainConfig, Trainer

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
    plan = None if args.no_eval else plan_evaluation(args.steps, args.batch_size, samples=args.eval_samples,
                                                     settings=args.eval_solvers)
    print(f"reading {args.dataset}" + (f" from {args.data_dir}" if args.data_dir else "") + " ...", flush=True)
    tick = time.perf_counter()
    data = load_image_dataset(args.dataset, root=args.data_dir)
    print(f"read {data.train_images.shape[0]} training and {data.held_out_images.shape[0]} held-out images of shape "
          f"{tuple(data.shape)} in {time.perf_counter() - tick:.1f} s", flush=True)
    num_classes = data.num_classes if args.conditional else None
    torch.manual_seed(args.seed)  # model initialisation
    if (args.model or "unet") == "unet":
        model = unet_for(data.shape, num_classes=num_classes)
    else:
        model = MLP(math.prod(data.shape), width=args.width, depth=args.depth, activation=args.activation,
                    time_embedding=args.time_embedding, num_classes=num_classes)
    model = model.to(args.device)  # initialised on the CPU: the same weights on every device
    matcher = ConditionalFlowMatcher(coupler=_make_coupler(args, args.conditional), sigma=args.sigma)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                         schedule=args.schedule, grad_clip=args.grad_clip, ema_decay=ema_decay,
                         ema_warmup=not args.no_ema_warmup, seed=args.seed,
                         eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, out_dir=str(out),
                         progress=not args.no_progress, workers=args.workers, threads=args.threads,
                         label_dropout=label_dropout, precision=args.precision, coupling_mode=args.coupling_mode)
    meta = {"model": model.config, "dataset": data.name, "shape": list(data.shape), "conditional": args.conditional,
            "num_classes": data.num_classes, "class_names": list(data.class_names), **_coupler_record(args)}
    run = f"{out.name}: {data.name}, {'conditional, ' if args.conditional else ''}{_coupler_title(args)}"

    def grid_during_training(sampling_model, step: int) -> dict:
        """Every --eval-every steps: the grid, and the image metrics at Euler NFE ``GRID_NFE`` for the log."""
        write_sample_grid(out / GRIDS_FOLDER / f"step_{step:06d}.png", sampling_model, data.shape, num_classes,
                          data.class_names, guidance, args.seed, f"{run}, step {step}")
        quality, _ = evaluate_image_model(sampling_model, data, classifier, n=plan.n if plan else _GRID_EVAL_SAMPLES,
                                          conditional=args.conditional, guidance=guidance, seed=args.seed,
                                          settings=(f"euler-{GRID_NFE}",), progress=not args.no_progress)
        return quality

    trainer = Trainer(model, matcher, gaussian_sampler(data.shape), data.train_sampler(labelled=args.conditional),
                      config, evaluate=grid_during_training if args.eval_every else None, metadata=meta)
    if _trained_on_other_rank(trainer, args):  # data-parallel: rank 0 alone evaluates and writes
        return 0
    classifier_config = ClassifierConfig(**({} if args.classifier_steps is None else {"steps": args.classifier_steps}))
    classifier = None
    if plan is not None or args.eval_every:
        cached = classifier_cache_path(data.train_images, data.train_labels, num_classes=data.num_classes,
                                       config=classifier_config)
        print(f"feature classifier: {'loading' if cached.exists() else 'training it once; it will be cached at'} "
              f"{cached}", flush=True)
        classifier = load_or_train_classifier(data.train_images, data.train_labels, num_classes=data.num_classes,
                                              config=classifier_config, progress=not args.no_progress)
    if plan is not None:
        print(plan.describe() + "; --eval-samples, --eval-solvers or --no-eval to change it", flush=True)
    with claim_run_folder(out, outputs=(METRICS_JSON,)):
        result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
        if _finished_earlier(result, out, args.steps):
            return 0
        sampling_model = trainer.sampling_model.eval()
        threads = args.threads or auto_threads(sampling_model, min(plan.n if plan else 64, EVAL_CHUNK), workers=0)
        quality, rows, tick = {}, [], time.perf_counter()
        with torch_threads(threads):
            if plan is not None:
                quality, rows = evaluate_image_model(sampling_model, data, classifier, n=plan.n,
                                                     conditional=args.conditional, guidance=guidance, seed=args.seed,
                                                     settings=plan.settings, inception_weights=args.inception_weights,
                                                     progress=not args.no_progress)
            figure = write_sample_grid(out / "samples.png", sampling_model, data.shape, num_classes, data.class_names,
                                       guidance, args.seed, f"{run}, step {result.step}", progress=not args.no_progress)
        eval_seconds = time.perf_counter() - tick
        metrics = {"dataset": data.name, "shape": list(data.shape), "model": model.config["kind"],
                   "conditional": args.conditional, **_coupler_record(args), "steps": result.step,
                   "batch_size": args.batch_size, "final_loss": result.loss, "steps_this_call": result.steps_trained,
                   "train_seconds_this_call": result.seconds, "workers": result.workers, "threads": result.threads,
                   "device": str(args.device), "precision": args.precision,
                   "eval_samples": plan.n if plan else 0, "eval_solvers": list(plan.settings) if plan else [],
                   "eval_seconds": eval_seconds, "held_out_images": data.held_out_images.shape[0],
                   "guidance": guidance if args.conditional else None, "label_dropout": label_dropout,
                   "ema_decay": ema_decay, "classifier_steps": classifier_config.steps,
                   "classifier_held_out_accuracy": (classifier_accuracy(classifier, data.held_out_images,
                                                                        data.held_out_labels) if classifier else None),
                   **quality}
        text = json.dumps(_json_value(metrics), indent=2, allow_nan=False) + "\n"
        atomic_write(out / METRICS_JSON, lambda f: f.write(text))
    if rows:
        print(_image_table(rows))
    if classifier is not None:
        print(f"classifier accuracy on held-out images: {metrics['classifier_held_out_accuracy']:.3f} (Fréchet "
              "distances are in its feature space)")
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
    from ot_cfm.evaluation.plotting import plot_image_grid

    shape, conditional = tuple(meta["shape"]), bool(meta["conditional"])
    if args.guidance is not None and not conditional:
        raise ValueError(f"--guidance applies to class-conditional checkpoints; {args.checkpoint} is unconditional")
    guidance = 1.0 if args.guidance is None else args.guidance
    x0 = torch.randn((args.n, *shape), generator=torch.Generator().manual_seed(args.seed))
    labels = torch.arange(args.n) % meta["num_classes"] if conditional else None
    steps = None if args.solver in ("dopri5", "tsit5") else args.steps
    per_image = steps * (2 if args.solver == "midpoint" else 4 if args.solver == "rk4" else 1) if steps else args.max_nfe
    with torch.no_grad(), tqdm(total=args.n * per_image, desc=f"sample {args.n} images ({args.solver})",
                               unit=" image-NFE", dynamic_ncols=True) as bar:  # adaptive: the cap bounds the total
        images, nfe = sample_images(model, x0, labels, guidance, solver=args.solver, steps=steps, progress=bar,
                                     **({"max_nfe": args.max_nfe} if steps is None else {}))
    path = Path(args.out)
    save_torch(path.with_suffix(".pt"), {"x0": x0, "x1": images, "labels": labels, "nfe": nfe})  # atomic, never through a link at that name
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
