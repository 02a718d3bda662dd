"""Image OT-CFM: exact minibatch OT on flattened images, torchcfm's UNet, against I-CFM at equal steps.

Default: scikit-learn's 8x8 digits (embedded; 1000 images for training, the other 797 held out).
Other data is read from local files only (``--data-path``; nothing is downloaded) by
``ot_cfm.images.datasets``: MNIST's IDX files (optionally gzipped), CIFAR-10's binary or python batches
(their test split is held out), a .npy / .npz array file or a folder with one subfolder of images
per class (a seeded share held out, ``--held-out-fraction``). Both methods train with the
Trainer (EMA on, checkpoints under ``--out``, ``--resume`` continues them) from the same initial
weights and data stream. Sample quality is the exact W2 in pixel space between generated and
held-out images at Euler NFE 1 and 4 and dopri5, next to the W2 between training and held-out images.

    python examples/images.py                        # digits, writes runs/images/images_digits.{png,md}
    python examples/images.py --figures examples/results   # the committed results
    python examples/images.py --resume               # after an interruption: continue both runs from their checkpoints
    python examples/images.py --overwrite            # start over where earlier runs left their checkpoints
    python examples/images.py --dataset mnist --data-path ~/data/mnist --figures runs/images
    python examples/images.py --dataset folder --data-path ~/data/faces --image-size 32 --model mlp
    python examples/images.py --quick                # smoke run, outputs in runs/images_quick
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.independent import IndependentCoupler
from ot_cfm.data import TensorSampler, gaussian_sampler
from ot_cfm.evaluation.metrics import wasserstein2
from ot_cfm.evaluation.plotting import save_figure
from ot_cfm.images import ImageDataset, load_image_dataset
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP, unet
from ot_cfm.solvers.ode import sample
from ot_cfm.training import TrainConfig, Trainer

METHODS = {"OT-CFM": ExactOTCoupler, "I-CFM": IndependentCoupler}
SOLVERS = {"euler-1": dict(solver="euler", steps=1), "euler-4": dict(solver="euler", steps=4),
           "dopri5": dict(solver="dopri5")}
DATASETS = ("digits", "mnist", "cifar10", "npy", "folder")
DIGITS_HELD_OUT = 797 / 1797  # 1000 digits for training, as in the recorded results
WARMUP_STEPS = 100  # fixed, so that a run resumed with more steps keeps its configuration


def load_images(name: str, data_path: Path | None, generator: torch.Generator, *,
                held_out_fraction: float | None = None, image_size: int | None = None) -> ImageDataset:
    """The dataset, read by ``ot_cfm.images.datasets`` (images (N, C, H, W) in [-1, 1], labels, a held-out split).

    MNIST and CIFAR-10 hold out their test split; digits, arrays and folders a share drawn from
    ``generator`` (digits: 797 of 1797; others: ``held_out_fraction``, default 0.2).
    """
    if name != "digits" and data_path is None:
        raise ValueError(f"--dataset {name} reads local files: give --data-path")
    if held_out_fraction is None:
        held_out_fraction = DIGITS_HELD_OUT if name == "digits" else 0.2
    return load_image_dataset(name, root=data_path, held_out_fraction=held_out_fraction, seed=generator,
                              size=image_size)


def build_model(kind: str, shape: tuple) -> nn.Module:
    if kind == "mlp":
        return MLP(math.prod(shape), width=256)
    # torchcfm has no default channel multipliers for 8x8 images; one level suits them
    return unet(shape, channels=32, res_blocks=1, **({"channel_mult": (1,)} if shape[-1] == 8 else {}))


def train(coupler, images: torch.Tensor, args, name: str) -> nn.Module:
    """Fit one model with the Trainer; returns its EMA weights for sampling."""
    shape = tuple(images.shape[1:])
    torch.manual_seed(args.seed)  # model initialisation: the same initial weights for every method
    model = build_model(args.model, shape)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=WARMUP_STEPS,
                         schedule="cosine", grad_clip=1.0, ema_decay=args.ema_decay, seed=args.seed,
                         checkpoint_every=max(1, args.steps // 4), out_dir=str(args.out / f"{args.dataset}_{name}"),
                         progress=not args.no_progress)
    meta = {"dataset": args.dataset, "model": args.model, "shape": list(shape), "method": name}
    trainer = Trainer(model, ConditionalFlowMatcher(coupler), gaussian_sampler(shape), TensorSampler(images), config,
                      metadata=meta)
    trainer.fit(resume=args.resume, overwrite=args.overwrite)
    return trainer.sampling_model.eval()


def evaluate(model: nn.Module, x0: torch.Tensor, held_out: torch.Tensor) -> tuple[dict, dict, dict]:
    """W2 (pixel space) and NFE per solver setting, and the generated images."""
    w2, nfe, images = {}, {}, {}
    for label, options in SOLVERS.items():
        out = sample(model, x0, **options)
        w2[label], nfe[label], images[label] = wasserstein2(out.x, held_out), out.nfe, out.x
    return w2, nfe, images


def plot_grids(path: Path, images: dict, title: str, per_side: int = 8) -> None:
    """One row per method, one column per solver setting: a per_side x per_side grid of samples each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = list(images), list(SOLVERS)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.2 * len(cols), 3.4 * len(rows)), squeeze=False)
    for r, method in enumerate(rows):
        for c, label in enumerate(cols):
            batch = torch.nn.functional.pad(images[method][label][: per_side ** 2].clamp(-1, 1), (1, 1, 1, 1))
            grid = rearrange(batch, "(r c) ch h w -> (r h) (c w) ch", r=per_side)  # mid-grey lines between cells
            ax = axes[r, c]
            ax.imshow(((grid + 1) / 2).squeeze(-1).numpy(), cmap="gray" if grid.shape[-1] == 1 else None)
            ax.set_title(f"{method}, {label}")
            ax.axis("off")
    save_figure(fig, path, title=title, dpi=100)


def to_markdown(w2: dict, nfe: dict, floor: float, noise: float, n: int, args, command: str) -> str:
    labels = list(SOLVERS)
    lines = [f"# Image OT-CFM on {args.dataset}", "", f"Command: `{command}`  ",
             f"Model {args.model}, {args.steps} steps of batch {args.batch_size}, lr {args.lr} ({WARMUP_STEPS} warm-up "
             f"steps, then cosine), grad clip 1, EMA {args.ema_decay}, seed {args.seed}. W2 in pixel space ([-1, 1]) "
             f"between {n} generated and {n} held-out images.", "",
             "| method | " + " | ".join(f"W2 {k} (NFE)" for k in labels) + " |",
             "| --- | " + " | ".join("---" for _ in labels) + " |"]
    for method in w2:
        lines.append(f"| {method} | " + " | ".join(f"{w2[method][k]:.3f} ({nfe[method][k]})" for k in labels) + " |")
    lines += ["", f"References: W2 between {n} training and {n} held-out images (floor) {floor:.3f}; "
              f"between the {n} noise images the samples start from and the held-out images {noise:.3f}."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: MLP, 150 steps, 200 evaluation images, outputs in runs/images_quick")
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--data-path", type=Path, default=None,
                   help="mnist: folder with its train-/t10k- images and labels IDX files (.gz allowed); cifar10: "
                        "folder with its binary or python batches (or the extracted cifar-10-batches-* folder); "
                        "npy: a .npy / .npz file; folder: one subfolder of images per class")
    p.add_argument("--held-out-fraction", type=float, default=None,
                   help="share held out for npy and folder data (default 0.2; digits keep 1000 for training)")
    p.add_argument("--image-size", type=int, default=None, help="folder data: resize every image to this square")
    p.add_argument("--model", choices=("unet", "mlp"), default="unet")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=1000, help="at most the number of held-out images")
    p.add_argument("--out", type=Path, default=Path("runs/images"), help="checkpoints and training logs")
    p.add_argument("--figures", type=Path, default=Path("runs/images"),
                   help="where images_<dataset>.png and .md go (the committed ones: examples/results)")
    p.add_argument("--resume", action="store_true", help="continue both runs from their checkpoints in --out")
    p.add_argument("--overwrite", action="store_true", help="start both runs over in an --out that holds earlier ones")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(argv=None) -> dict:
    """Train both methods, evaluate, write the figure and the table; returns W2s, NFEs, references and paths."""
    parser = build_parser()
    if parser.parse_known_args(argv)[0].quick:  # new defaults: flags given explicitly still win
        parser.set_defaults(model="mlp", steps=150, eval_samples=200, no_progress=True,
                            out=Path("runs/images_quick"), figures=Path("runs/images_quick"))
    args = parser.parse_args(argv)
    command = "python examples/images.py " + " ".join(sys.argv[1:] if argv is None else argv)
    generator = torch.Generator().manual_seed(args.seed)
    dataset = load_images(args.dataset, args.data_path, generator, held_out_fraction=args.held_out_fraction,
                          image_size=args.image_size)
    train_images, held_out = dataset.train_images, dataset.held_out_images
    n = min(args.eval_samples, held_out.shape[0])
    held_out = held_out[torch.randperm(held_out.shape[0], generator=generator)[:n]]
    floor = wasserstein2(train_images[torch.randperm(train_images.shape[0], generator=generator)[:n]], held_out)
    x0 = torch.randn((n, *held_out.shape[1:]), generator=generator)
    noise = wasserstein2(x0, held_out)
    w2, nfe, images = {}, {}, {}
    for name, coupler in METHODS.items():
        model = train(coupler(), train_images, args, name)
        w2[name], nfe[name], images[name] = evaluate(model, x0, held_out)
    figure, table = args.figures / f"images_{args.dataset}.png", args.figures / f"images_{args.dataset}.md"
    plot_grids(figure, images, f"{args.dataset}: {args.model}, {args.steps} steps, same noise in every panel")
    table.write_text(to_markdown(w2, nfe, floor, noise, n, args, command))
    print(table.read_text())
    return {"w2": w2, "nfe": nfe, "floor": floor, "noise": noise, "figure": figure, "table": table}


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
