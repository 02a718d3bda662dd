"""CIFAR-10 on a GPU: OT-CFM with torchcfm's 32x32 UNet, the settings, a step-time measurement, and a CPU smoke mode.

Settings (``GPU_SETTINGS``): ``unet_for((3, 32, 32))``, the preset of torchcfm's CIFAR-10 training script
(128 base channels, 2 residual blocks per level, multipliers 1, 2, 2, 2, attention at 16x16, 4 heads of 64
channels, dropout 0.1); batch 128; Adam at lr 2e-4 after 5000 warm-up steps, grad clip 1, EMA 0.9999
(torchcfm's values); bf16 autocast; exact minibatch OT coupled on the CPU, overlapped with the GPU step by
the Trainer's background thread (no worker processes) or by ``--workers`` processes.

Memory: the model state takes 20 bytes per parameter in fp32 training (weights 4, gradients 4, Adam's two
moments 8, the EMA copy 4; bf16 autocast keeps all of them in float32), counted from the model built here.
Activations at batch 128 come on top; they depend on the kernels chosen and are not estimated: ``--measure``
reports the peak that ``torch.cuda.max_memory_allocated`` sees. No GPU numbers are recorded in this
repository; run ``--measure`` on a GPU to get them.

    python examples/cifar10.py --data-dir ~/data/cifar-10-batches-py          # train (GPU), runs/cifar10
    python examples/cifar10.py --measure                                      # steps/s and peak memory, CIFAR shapes
    python examples/cifar10.py --quick                                        # CPU smoke run (seconds), runs/cifar10_quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.independent import IndependentCoupler
from ot_cfm.data import gaussian_sampler
from ot_cfm.evaluation.plotting import plot_image_grid
from ot_cfm.images import CIFAR10_CLASSES, ImageDataset, load_image_dataset
from ot_cfm.images.sampling import sample_images
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import UNET_PRESETS, unet_for
from ot_cfm.training import TrainConfig, Trainer
from ot_cfm.training.batches import overlap_mode
from ot_cfm.utils.atomic import atomic_write

SHAPE = (3, 32, 32)
#: bytes of model state per parameter in fp32 training with Adam and EMA: weights, gradients, two moments, EMA
STATE_BYTES_PER_PARAMETER = 4 + 4 + 8 + 4
COUPLERS = {"exact": ExactOTCoupler, "independent": IndependentCoupler}
#: the GPU run; torchcfm's CIFAR-10 script trains 400k steps of this
GPU_SETTINGS = dict(batch_size=128, lr=2e-4, warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999, precision="bf16")
#: the smoke run: a UNet small enough for a CPU (same code path, other widths)
QUICK_UNET = dict(channels=32, res_blocks=1, channel_mult=(1,), attention=(), num_heads=1, num_head_channels=-1,
                  dropout=0.0)
QUICK_IMAGES = 64


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_memory(parameters: int) -> dict:
    """The model state's bytes in fp32 training with Adam and EMA (``STATE_BYTES_PER_PARAMETER`` per parameter)."""
    total = STATE_BYTES_PER_PARAMETER * parameters
    return {"parameters": parameters, "bytes_per_parameter": STATE_BYTES_PER_PARAMETER, "state_bytes": total,
            "state_gib": total / 2**30, "what": "weights, gradients, Adam's two moments and the EMA copy, float32; "
                                                 "activations not included"}


def random_cifar_file(path: Path, n: int, seed: int) -> Path:
    """A .npy of n random uint8 images (n, 32, 32, 3), CIFAR-10's shape and dtype, and labels (.npz)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, len(CIFAR10_CLASSES), size=n)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, images=images, labels=labels), binary=True)
    return path


def describe(data: ImageDataset) -> str:
    return "CIFAR-10" if data.name == "cifar10" else "random CIFAR-shaped images"


def build_model(args) -> nn.Module:
    torch.manual_seed(args.seed)  # model initialisation, on the CPU: the same weights on every device
    return unet_for(SHAPE, **(QUICK_UNET if args.quick else {})).to(args.device)


def make_trainer(args, data: ImageDataset, coupler: str, *, steps: int, out_dir: str | None = None,
                 schedule: str = "cosine", workers: int | str | None = None) -> Trainer:
    config = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                         schedule=schedule, grad_clip=args.grad_clip, ema_decay=args.ema_decay, seed=args.seed,
                         out_dir=out_dir, progress=not args.no_progress,
                         workers=args.workers if workers is None else workers, precision=args.precision,
                         checkpoint_every=max(1, min(5000, steps)))
    meta = {"dataset": data.name, "shape": list(SHAPE), "coupler": coupler}
    return Trainer(build_model(args), ConditionalFlowMatcher(COUPLERS[coupler]()), gaussian_sampler(SHAPE),
                   data.train_sampler(), config, metadata=meta)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, data: ImageDataset) -> list[dict]:
    """Steps per second of each coupler, batches drawn inline (each when its step needs it) and overlapped
    (the Trainer's background thread on a GPU, or ``--workers`` processes), after ``--warmup-measure`` untimed
    steps; and the peak memory the device allocator saw (CUDA only)."""
    rows = []
    for coupler in COUPLERS:
        for mode in ("inline", "overlapped"):
            trainer = make_trainer(args, data, coupler, steps=args.warmup_measure + args.measure_steps,
                                   schedule="constant", workers=0 if mode == "inline" else None)
            device = trainer.device
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(args.warmup_measure):
                trainer.train_step()
            _synchronise(device)
            if mode == "inline":
                start = time.perf_counter()
                for _ in range(args.measure_steps):
                    trainer.train_step()
                _synchronise(device)
                seconds, ran = time.perf_counter() - start, "inline"
            else:
                result = trainer.fit()  # continues from the warm-up steps to the end
                _synchronise(device)
                seconds, ran = result.seconds, overlap_mode(device, result.workers, trainer.coupling_device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            rows.append({"coupler": coupler, "mode": mode, "batches": ran, "steps": args.measure_steps,
                         "seconds": seconds, "steps_per_second": args.measure_steps / seconds, "peak_gib": peak})
            print(f"{coupler}, {mode} ({ran}): {args.measure_steps / seconds:.2f} steps/s"
                  + (f", peak {peak:.2f} GiB" if peak is not None else ""), flush=True)
            del trainer
    return rows


def measure_markdown(rows: list[dict], args, device_name: str, memory: dict) -> str:
    lines = [f"# CIFAR-10 shapes: OT-CFM step time on {device_name}", "",
             f"UNet {'(smoke-run widths) ' if args.quick else ''}with {memory['parameters']:,} parameters; model state "
             f"{memory['state_gib']:.2f} GiB ({memory['what']}). Batch {args.batch_size}, precision {args.precision}, "
             f"{args.warmup_measure} untimed steps, then {args.measure_steps} timed.", "",
             "| coupler | batches | steps/s | peak memory (GiB) |", "| --- | --- | --- | --- |"]
    for r in rows:
        peak = "n/a (not CUDA)" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['coupler']} | {r['mode']} ({r['batches']}) | {r['steps_per_second']:.2f} | {peak} |")
    return "\n".join(lines) + "\n"


def train(args, data: ImageDataset) -> dict:
    """Train OT-CFM (``--coupler``) for ``--steps``; write a sample grid of the EMA weights (Euler, 8 steps)."""
    trainer = make_trainer(args, data, args.coupler, steps=args.steps, out_dir=str(args.out / "run"))
    result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    model = trainer.sampling_model.eval()
    x0 = torch.randn((args.grid_images, *SHAPE), generator=torch.Generator().manual_seed(args.seed + 20_000))
    with torch.no_grad():
        images, nfe = sample_images(model, x0, None, 1.0, solver="euler", steps=8)
    figure = plot_image_grid(args.out / "cifar10_samples.png", images, columns=8,
                             title=f"{describe(data)}: {args.coupler} coupler, step {result.step}, Euler NFE {nfe:g}")
    return {"step": result.step, "loss": result.loss, "seconds": result.seconds,
            "ms_per_step": 1000 * result.seconds / max(1, result.steps_trained), "workers": result.workers,
            "threads": result.threads, "figure": str(figure)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run (seconds): a small UNet, random CIFAR-shaped images, batch 4, two steps of "
                        "training and one timed step per measurement, outputs in runs/cifar10_quick")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="CIFAR-10's binary or python batches (or the extracted cifar-10-batches-* folder); nothing "
                        "is downloaded. Without it, random images of CIFAR-10's shape (for --measure)")
    p.add_argument("--measure", action="store_true", help="only measure steps/s and peak memory, no training run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="bf16 on a GPU, fp32 on the CPU when not given")
    p.add_argument("--coupler", choices=tuple(COUPLERS), default="exact")
    p.add_argument("--steps", type=int, default=400_000)
    p.add_argument("--batch-size", type=int, default=GPU_SETTINGS["batch_size"])
    p.add_argument("--lr", type=float, default=GPU_SETTINGS["lr"])
    p.add_argument("--warmup", type=int, default=GPU_SETTINGS["warmup_steps"])
    p.add_argument("--grad-clip", type=float, default=GPU_SETTINGS["grad_clip"])
    p.add_argument("--ema-decay", type=float, default=GPU_SETTINGS["ema_decay"])
    p.add_argument("--workers", default="auto", type=lambda v: v if v == "auto" else int(v),
                   help="worker processes that couple batches ('auto': the Trainer's rule; on a GPU without workers "
                        "a background thread overlaps the coupling)")
    p.add_argument("--warmup-measure", type=int, default=20, help="untimed steps before each measurement")
    p.add_argument("--measure-steps", type=int, default=100)
    p.add_argument("--grid-images", type=int, default=64, help="images in the sample grid (8 to a row)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/cifar10"))
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(argv=None) -> dict:
    parser = build_parser()
    if parser.parse_known_args(argv)[0].quick:  # new defaults: flags given explicitly still win
        parser.set_defaults(device="cpu", batch_size=4, steps=2, warmup=1, ema_decay=0.9, workers=0,
                            warmup_measure=1, measure_steps=1, grid_images=16, no_progress=True, out=Path("runs/cifar10_quick"))
    args = parser.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data_dir is not None:
        data = load_image_dataset("cifar10", root=args.data_dir)
    else:  # random images of CIFAR-10's shape, through the library's array reader
        data = load_image_dataset(random_cifar_file(args.out / "random_cifar.npz", QUICK_IMAGES, args.seed))
    if data.shape != SHAPE:
        raise ValueError(f"{args.data_dir}: images of shape {data.shape}; expected CIFAR-10's {SHAPE}")
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    with torch.device("meta"):  # the full preset's parameter count, without allocating its weights
        full = parameter_count(unet_for(SHAPE))
    used = parameter_count(build_model(args))
    report = {"device": device_name, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "preset": dataclasses.asdict(UNET_PRESETS["cifar10"]), "memory": state_memory(used),
              "memory_full_preset": state_memory(full), "dataset": describe(data)}
    if args.measure or args.quick:
        rows = measure(args, data)
        report["measure"] = rows
        text = measure_markdown(rows, args, device_name, report["memory"])
        atomic_write(args.out / "cifar10_steps.md", lambda f: f.write(text))
        print(text)
    if not args.measure:
        report["train"] = train(args, data)
    atomic_write(args.out / "cifar10.json", lambda f: f.write(json.dumps(report, indent=1, allow_nan=False) + "\n"))
    memory = report["memory"]
    print(f"UNet parameters {memory['parameters']:,}: model state {memory['state_gib']:.2f} GiB "
          f"({memory['bytes_per_parameter']} bytes per parameter; activations not included)")
    print(f"wrote {args.out / 'cifar10.json'}" + (f", {report['train']['figure']}" if "train" in report else ""))
    return report


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
