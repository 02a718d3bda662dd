"""The ``ot-cfm`` command line: train, sample, and the experiments (manifold, batch-size).

``ot-cfm train`` trains on a 2D toy pair (``--source``/``--target``), with ``--data`` on the rows (N, d) of
a .npy / .npz / .csv file (source N(0, I) in d dimensions; optionally class-conditional) or, with
``--dataset``, on images (source N(0, I) of the image shape; optionally class-conditional), evaluates
the sampling weights at several NFE (``--data``: against its held-out rows) and writes a checkpoint,
``metrics.json`` and a figure (a scatter or a sample grid). ``ot-cfm sample`` draws from such a
checkpoint (``--data`` runs: in the file's units, undoing ``--standardize``).

``torchrun --nproc_per_node=N -m ot_cfm.cli train ...`` (or ``torchrun ... $(which ot-cfm) train ...``) trains
toy and ``--data`` runs data-parallel (``ot_cfm.training.distributed``): ``--batch-size`` is the global batch,
``--coupling-mode`` chooses one global coupling or one per process, rank 0 writes and evaluates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ot_cfm.cli.arrays import _sample_array_checkpoint, _train_array
from ot_cfm.cli.common import (
    COUPLERS,
    PRECISION_CHOICES,
    TOY_DEFAULTS,
    _array_only_options,
    _device_name,
    _HelpWithDefaults,
    _image_only_options,
    _load_sampling_model,
    _seed,
    _threads,
    _train_device,
    _workers,
    resolve_device,
)
from ot_cfm.cli.images import EVAL_CHUNK, IMAGE_EMA_DECAY, _sample_image_checkpoint, _train_images
from ot_cfm.cli.toy import _sample_toy_checkpoint, _train_toy
from ot_cfm.utils.parallelism import auto_threads

__all__ = ["main", "build_parser"]

# Commands whose options belong to an experiment module: everything after the name is handed over.
EXPERIMENTS = {
    ("manifold",): ("manifold_tests.experiment", "terminal normal hyperbolicity of exact, learned and empirical fields"),
    ("experiment", "batch-size"): ("ot_cfm_experiments.batch_size",
                                   "how minibatch OT-CFM approaches population OT-CFM as the batch grows"),
}


def cmd_train(args) -> int:
    args.device = _train_device(args)  # a clear error before any data is read or model built
    if args.dataset is None and args.eval_samples is None:
        args.eval_samples = 2000  # image runs choose theirs from the run (ot_cfm.images.sampling.plan_evaluation)
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


def cmd_sample(args) -> int:
    device = resolve_device(args.device)
    args.out = str(_sample_output(args))
    model, meta = _load_sampling_model(Path(args.checkpoint))
    model = model.to(device)  # the noise is drawn on the CPU and moved: the same samples on every device
    if "dataset" in meta:
        torch.set_num_threads(args.threads or auto_threads(model, min(args.n, EVAL_CHUNK), workers=0))
        return _sample_image_checkpoint(args, model, meta)
    if "data" in meta:
        torch.set_num_threads(args.threads or auto_threads(model, args.n, workers=0))
        return _sample_array_checkpoint(args, model, meta)
    if args.guidance is not None:
        raise ValueError(f"--guidance applies to class-conditional image checkpoints; {args.checkpoint} is a toy run")
    torch.set_num_threads(args.threads or auto_threads(model, args.n, workers=0))  # this process is ours
    return _sample_toy_checkpoint(args, model, meta)


def _sample_output(args) -> Path:
    """Where ``ot-cfm sample`` writes (``--out``, or samples/samples beside the checkpoint), refusing to replace
    earlier samples without ``--overwrite``."""
    out = Path(args.out) if args.out is not None else Path(args.checkpoint).parent / "samples" / "samples"
    existing = [p for p in (out.with_suffix(".pt"), out.with_suffix(".png")) if p.exists() or p.is_symlink()]
    if existing and not args.overwrite:
        raise ValueError(f"{' and '.join(map(str, existing))} already exist: choose another --out, or pass "
                         "--overwrite to replace them")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``ot-cfm`` argument parser: the train, sample and experiment commands with their options."""
    from ot_cfm.data import TOY_DATASETS
    from ot_cfm.images import IMAGE_DATASETS
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
    train.add_argument("--pairs-with-replacement", action="store_true",
                       help="draw each batch's pairs with replacement from the coupler's pairs (about 37 %% repeats; "
                            "with --coupler exact, torchcfm's OT plan sampling); default: every pair once")
    train.add_argument("--sigma", type=float, default=0.0, help="path noise of the matcher")
    train.add_argument("--steps", type=int, default=5000, help="optimisation steps")
    train.add_argument("--batch-size", type=int, default=256,
                       help="points per batch; under torchrun the global batch, of which each of the N processes "
                            "trains on batch / N rows")
    train.add_argument("--coupling-mode", choices=("global", "local"), default="global",
                       help="under torchrun: couple the whole global batch as one problem (solved by one process per "
                            "step in turn, the pairs of a single process) or each process's rows on their own; the "
                            "same in a single process")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    train.add_argument("--warmup", type=int, default=0, help="linear lr warm-up steps")
    train.add_argument("--schedule", choices=("constant", "cosine"), default="cosine",
                       help="lr schedule after the warm-up (cosine: to 0 at --steps, so --resume cannot extend it)")
    train.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    train.add_argument("--ema-decay", type=float, default=None,
                       help=f"EMA of the weights for sampling (0: off; when not given 0 for toy runs, "
                            f"{IMAGE_EMA_DECAY} for image runs)")
    train.add_argument("--no-ema-warmup", action="store_true",
                       help="keep the EMA decay constant from the first step (without it the decay after step k is "
                            "min(--ema-decay, (1 + k) / (10 + k)), so short runs average trained weights); resumes runs "
                            "written before the warm-up existed")
    train.add_argument("--width", type=int, default=64, help="MLP hidden width (image runs: with --model mlp)")
    train.add_argument("--depth", type=int, default=3, help="MLP hidden layers")
    train.add_argument("--activation", choices=ACTIVATIONS, default="selu",
                       help="MLP activation")
    train.add_argument("--time-embedding", choices=("concat", "sinusoidal"), default="concat",
                       help="how t enters the MLP")
    train.add_argument("--seed", type=_seed, default=0, help="seed of the weights, batches and t draws")
    train.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    train.add_argument("--workers", type=_workers, default="auto", metavar="{auto,N}",
                       help="processes that draw and couple batches ahead of the model step (0: none; auto: for "
                            "the exact coupler on 2 or more cores, cores - 1 but at least 2 and at most 8, else 0; "
                            "the weights do not depend on it)")
    train.add_argument("--threads", type=_threads, default="auto", metavar="{auto,N}",
                       help="torch threads of the training process (auto: 1 for small models, else the cores the "
                            "workers leave)")
    train.add_argument("--device", type=_device_name, default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                       help="where the model trains (auto: cuda when available, else cpu); batches are drawn, and "
                            "exactly coupled, on the CPU either way")
    train.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                       help="autocast dtype of the model's forward and loss (weights and optimizer stay float32); "
                            "fp16 needs a GPU, the CPU takes bf16")
    train.add_argument("--eval-samples", type=int, default=None,
                       help="samples of the final evaluation (toy and --data: W2 and NPE, 2000 when not given; images: "
                            "Fréchet distance, pixel W2, class coverage and conditional accuracy, chosen from the run "
                            "when not given so that the evaluation costs about a quarter of training)")
    train.add_argument("--eval-solvers", default=None, metavar="SETTINGS",
                       help="image runs: the solver settings of the final evaluation, e.g. euler-1,euler-8,dopri5 "
                            "(chosen from the run when not given; adaptive solvers are capped at 200 NFE)")
    train.add_argument("--no-eval", action="store_true",
                       help="image runs: no evaluation after training (the checkpoint and the sample grid only)")
    train.add_argument("--out", default="runs/default", help="output folder")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument("--overwrite", action="store_true",
                       help="start over in an --out that holds another run (without it, such a folder is refused)")
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
    smp.add_argument("--seed", type=_seed, default=0, help="seed of the source draws")
    smp.add_argument("--guidance", type=float, default=None,
                     help="class-conditional image checkpoints: classifier-free guidance scale (1.0 when not given); "
                          "the samples ask for the classes 0, 1, ..., K-1, 0, 1, ... in turn")
    smp.add_argument("--threads", type=_threads, default="auto", metavar="{auto,N}",
                     help="torch threads (auto: 1 for small models, else all cores)")
    smp.add_argument("--device", type=_device_name, default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                     help="where the model runs (auto: cuda when available, else cpu); the noise is drawn on the "
                          "CPU, so samples agree across devices up to arithmetic")
    smp.add_argument("--out", default=None,
                     help="output path without suffix (.pt and .png written: a scatter for toy runs, a sample grid "
                          "for image runs); by default samples/samples beside the checkpoint")
    smp.add_argument("--overwrite", action="store_true",
                     help="replace samples already at --out (without it they are refused)")
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
    """Run ``ot-cfm`` with ``argv`` (the process's arguments when None); returns the exit status."""
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
    finally:
        if dist.is_available() and dist.is_initialized():  # set up by the Trainer under torchrun
            dist.destroy_process_group()
