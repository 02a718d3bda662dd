"""Digits on a CPU: OT-CFM against I-CFM and torchcfm's OT-CFM, unconditional and class-conditional.

Five variants train on scikit-learn's 8x8 digits (embedded; the library's seeded split, 1438 images
for training, 359 held out) with one model, one optimiser loop (``Trainer``) and equal steps and seeds:

- ``OT-CFM``: exact minibatch OT (``ExactOTCoupler``);  ``I-CFM``: independent pairs (``IndependentCoupler``);
- ``OT-CFM, pairs with replacement`` and ``I-CFM, pairs with replacement``: the same couplers, each batch's pairs
  drawn with replacement from theirs (``ResampledCoupler``), as torchcfm's plan sampler draws them;
- ``torchcfm OT-CFM``: torchcfm's ``ExactOptimalTransportConditionalFlowMatcher`` makes (t, x_t, u_t) from the
  same batches, our model and loop train on them (the reference; unconditional). It draws the batch's pairs from
  the OT plan with replacement (about 37 % of them repeats); ``torchcfm OT-CFM, no replacement`` draws them
  without (``OTPlanSampler.sample_plan(replace=False)``: every pair of the optimal permutation once, as ours);
- ``OT-CFM, conditional``: OT within classes (``ClassConditionalCoupler``); ``I-CFM, conditional``: independent
  pairs; both with label dropout and classifier-free guidance (``guided_field``) at sampling.

Every variant of a seed starts from the same initial weights (ot-cfm's ``MLP``; the 8x8 UNet preset takes
about 60 times as long per step on a CPU) and draws the same noise, data and t. Metrics, on fixed noise
against the held-out images, at Euler NFE 1, 2, 4, 8 and dopri5: the Fréchet distance in the feature space of
the package's classifier, pixel W2, mode coverage (entropy of the classifier's label histogram over log 10,
share of the least frequent class) and, for conditional variants, the share classified as the class asked
for (``ot_cfm.images.sampling.evaluate_image_model``, as ``ot-cfm train --dataset digits`` reports them). Mean ± sample
standard deviation over seeds.

Memorisation: the exact OT-CFM field of the training images (``proximal``'s discrete Brenier potential, fitted
semi-discretely from N(0, I)) carries every noise image to a training image. The figure shows learned samples
beside exact-field samples from the same noise, each with its distance to the nearest training image and the
ratio of that distance to the training image's own nearest-neighbour distance
(``ot_cfm.images.memorisation_distances``).

    python examples/digits.py                            # writes runs/digits/digits.{md,json} and figures
    python examples/digits.py --out examples/results     # the committed results
    python examples/digits.py --seeds 0 1 2 3 4 --steps 5000
    python examples/digits.py --quick                    # smoke run (seconds), writes runs/digits_quick
    python examples/digits.py --variants OT-CFM "OT-CFM, pairs with replacement" --batch-size 64 --no-memorisation
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import t as student_t
from torch import nn
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher as TorchcfmBase
from torchcfm.conditional_flow_matching import ExactOptimalTransportConditionalFlowMatcher

from ot_cfm.couplers.conditional import ClassConditionalCoupler
from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.independent import IndependentCoupler
from ot_cfm.couplers.resampled import ResampledCoupler
from ot_cfm.data import gaussian_sampler
from ot_cfm.evaluation.metrics import wasserstein2
from ot_cfm.evaluation.plotting import image_mosaic, save_figure
from ot_cfm.images import (
    ClassifierConfig,
    ImageDataset,
    classifier_accuracy,
    evaluate_images,
    load_image_dataset,
    load_or_train_classifier,
    memorisation_distances,
)
from ot_cfm.images.sampling import (
    IMAGE_EULER_NFES,
    evaluate_image_model,
    evaluation_noise,
    sample_images,
    write_sample_grid,
)
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.solvers.ode import sample
from ot_cfm.training import TrainConfig, Trainer
from ot_cfm.utils.atomic import atomic_write
from ot_cfm.utils.parallelism import available_cores, torch_threads
from proximal import ExactVelocityField, fit_discrete_potential

SOLVERS = tuple(f"euler-{k}" for k in IMAGE_EULER_NFES) + ("dopri5",)
METRICS = {"frechet_distance": "Fréchet distance (classifier features)", "w2": "pixel W2",
           "coverage_entropy": "coverage entropy", "least_frequent_share": "least-class share",
           "conditional_accuracy": "conditional accuracy"}
WARMUP_STEPS = 100  # at most; a tenth of the steps in shorter runs
MEMORISATION_SHOWN = 8  # samples shown in the memorisation figure (the histogram uses all of them)


class TorchcfmMatcher(ConditionalFlowMatcher):
    """torchcfm's ``ExactOptimalTransportConditionalFlowMatcher`` (sigma 0) as the Trainer's matcher: the batches
    arrive as i.i.d. draws (no coupler of ours), torchcfm samples pairs from its OT plan (with replacement, as its
    matcher does, or without), then t and (t, x_t, u_t); the loss is E |v(t, x_t) - u_t|^2, as in torchcfm's README.
    torchcfm draws from numpy's and torch's global generators."""

    def __init__(self, replace: bool = True):
        super().__init__(coupler=None, sigma=0.0)
        self.reference, self.replace = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0), replace

    def __repr__(self) -> str:
        return f"TorchcfmMatcher(ExactOptimalTransportConditionalFlowMatcher(sigma=0.0), replace={self.replace})"

    def loss(self, model, x0: torch.Tensor, x1: torch.Tensor, **_) -> torch.Tensor:
        if self.replace:
            t, x_t, u_t = self.reference.sample_location_and_conditional_flow(x0, x1)
        else:  # the same steps as torchcfm's matcher, with its plan sampler's replace=False
            x0, x1 = self.reference.ot_sampler.sample_plan(x0, x1, replace=False)
            t, x_t, u_t = TorchcfmBase.sample_location_and_conditional_flow(self.reference, x0, x1)
        return torch.mean((model(t, x_t) - u_t) ** 2)


@dataclass(frozen=True)
class Variant:
    """name; pairing "exact" (within classes when conditional), "independent", "torchcfm" (pairs drawn from the
    plan with replacement) or "torchcfm-unique" (without); conditional; replace: our coupler's pairs drawn with
    replacement (``ResampledCoupler``)."""

    name: str
    pairing: str
    conditional: bool = False
    replace: bool = False

    def matcher(self) -> ConditionalFlowMatcher:
        if self.pairing.startswith("torchcfm"):
            return TorchcfmMatcher(replace=self.pairing == "torchcfm")
        if self.pairing == "exact":
            coupler = ClassConditionalCoupler() if self.conditional else ExactOTCoupler()
        else:
            coupler = IndependentCoupler()
        return ConditionalFlowMatcher(ResampledCoupler(coupler) if self.replace else coupler)


VARIANTS = (Variant("OT-CFM", "exact"), Variant("OT-CFM, pairs with replacement", "exact", replace=True),
            Variant("I-CFM", "independent"), Variant("I-CFM, pairs with replacement", "independent", replace=True),
            Variant("torchcfm OT-CFM", "torchcfm"), Variant("torchcfm OT-CFM, no replacement", "torchcfm-unique"),
            Variant("OT-CFM, conditional", "exact", True), Variant("I-CFM, conditional", "independent", True))
#: (ours, torchcfm's) with one pair sampling, then across: the goal's comparisons
TORCHCFM_COMPARISONS = (("OT-CFM, pairs with replacement", "torchcfm OT-CFM"),
                        ("OT-CFM", "torchcfm OT-CFM, no replacement"), ("OT-CFM", "torchcfm OT-CFM"))
#: (without, with replacement): the pair-sampling section's comparisons
RESAMPLING_COMPARISONS = (("OT-CFM", "OT-CFM, pairs with replacement"), ("I-CFM", "I-CFM, pairs with replacement"))


def warmup_steps(steps: int) -> int:
    return min(WARMUP_STEPS, steps // 10)


def build_model(args, conditional: bool, num_classes: int) -> nn.Module:
    return MLP(64, width=args.width, depth=args.depth, time_embedding=args.time_embedding,
               num_classes=num_classes if conditional else None)


def train(variant: Variant, data: ImageDataset, args, seed: int) -> tuple[nn.Module, float]:
    """Train one variant for one seed; returns (EMA model in eval mode, training seconds)."""
    torch.manual_seed(seed)  # model initialisation: the same initial weights for every variant of a seed
    np.random.seed(seed)     # torchcfm's plan sampling draws from numpy's global generator
    model = build_model(args, variant.conditional, data.num_classes)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=warmup_steps(args.steps),
                         schedule="cosine", grad_clip=1.0, ema_decay=args.ema_decay, seed=seed, progress=False,
                         workers=0, threads=1, label_dropout=args.label_dropout if variant.conditional else 0.0)
    trainer = Trainer(model, variant.matcher(), gaussian_sampler(data.shape),
                      data.train_sampler(labelled=variant.conditional), config)
    result = trainer.fit()
    return trainer.sampling_model.eval(), result.seconds


def references(data: ImageDataset, classifier, n: int) -> dict:
    """The metrics of training images against the held-out ones (what a perfect sampler of the training set
    scores) and the classifier's accuracy on held-out images."""
    train = data.train_images[:n]
    quality = evaluate_images(train, data.held_out_images, classifier, requested_labels=data.train_labels[:n])
    return {"frechet_distance": quality.frechet_distance, "w2": wasserstein2(train, data.held_out_images),
            "coverage_entropy": quality.coverage_entropy, "least_frequent_share": quality.least_frequent_share,
            "classifier_held_out_accuracy": classifier_accuracy(classifier, data.held_out_images,
                                                                data.held_out_labels),
            "icfm_exact_one_step": evaluate_images(data.train_images.mean(0).expand(n, *data.shape),
                                                   data.held_out_images, classifier).frechet_distance,
            "images": n}


def icfm_field_error(model: nn.Module, data: ImageDataset, n: int, seed: int) -> float:
    """Mean squared error per pixel of the learned field at t = 0 against I-CFM's exact one,
    u(0, x0) = E[x1] - x0 (x1 uniform on the training images, independent of x0), on the noise x0 (n, *shape)
    that the table's one-step samples start from. One Euler step of the exact field gives the mean image."""
    x0 = evaluation_noise(n, data.shape, seed)
    with torch.no_grad():
        v = model(torch.zeros(n), x0)
    return float((v - (data.train_images.mean(0) - x0)).square().mean())


def summarise(runs: list[dict]) -> dict:
    """{variant: {solver: {metric: (mean, std)}}} over seeds; std is the sample standard deviation (0 for one)."""
    out: dict = {}
    for run in runs:
        for row in run["rows"]:
            cell = out.setdefault(run["variant"], {}).setdefault(row["solver"], {})
            for key, value in row.items():
                if key != "solver":
                    cell.setdefault(key, []).append(value)
    for solvers in out.values():
        for cell in solvers.values():
            for key, values in cell.items():
                cell[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def fmt(pair, digits: int = 3) -> str:
    mean, std = pair
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired_ratios(runs: list[dict], a: str, b: str, solver: str, metric: str = "frechet_distance") -> list[float]:
    """``metric`` of variant a over that of variant b at ``solver``, one ratio per seed (same noise)."""
    values = {(r["variant"], r["seed"]): next(row[metric] for row in r["rows"] if row["solver"] == solver)
              for r in runs}
    return [values[(a, seed)] / values[(b, seed)] for (name, seed) in values if name == a]


def beyond_noise(ratios: list[float]) -> bool | None:
    """Whether the per-seed log ratios are above 0 beyond the seeds' noise: a one-sided t-test at 5 %, mean >
    t_{0.95, n-1} standard errors (2.92 for 3 seeds); None for one seed."""
    if len(ratios) < 2:
        return None
    logs = [math.log(q) for q in ratios]
    return statistics.fmean(logs) > float(student_t.ppf(0.95, len(logs) - 1)) * statistics.stdev(logs) / math.sqrt(len(logs))


def goal_lines(summary: dict, runs: list[dict]) -> list[str]:
    """The issue's goals, checked on the means: OT-CFM below I-CFM in Fréchet distance at NFE 1 and 2 (both
    unconditional and conditional), and OT-CFM not above torchcfm's at any solver setting, with the same pair
    sampling and across. Above counts as worse where the per-seed log ratios put it beyond noise (``beyond_noise``)."""
    lines = []
    for ot, ind in (("OT-CFM", "I-CFM"), ("OT-CFM, conditional", "I-CFM, conditional")):
        for solver in ("euler-1", "euler-2"):
            if ot not in summary or ind not in summary:
                continue
            a, b = summary[ot][solver]["frechet_distance"], summary[ind][solver]["frechet_distance"]
            verdict = "lower" if a[0] < b[0] else "NOT lower"
            lines.append(f"- {ot} vs {ind}, {solver}: Fréchet distance {fmt(a)} vs {fmt(b)} "
                         f"(ratio {a[0] / b[0]:.2f}): {verdict}")
    for ours, reference in TORCHCFM_COMPARISONS:
        if ours not in summary or reference not in summary:
            continue
        mean = {s: summary[ours][s]["frechet_distance"][0] / summary[reference][s]["frechet_distance"][0]
                for s in SOLVERS}
        per_seed = {s: paired_ratios(runs, ours, reference, s) for s in SOLVERS}
        above = [s for s in SOLVERS if mean[s] > 1]
        worse = [s for s in above if beyond_noise(per_seed[s])]
        unsure = [s for s in above if beyond_noise(per_seed[s]) is None]
        if worse:
            verdict = f"WORSE than {reference}'s at " + ", ".join(worse)
        elif unsure:
            verdict = f"above {reference}'s at {', '.join(unsure)} (one seed: no noise estimate)"
        elif above:
            verdict = f"not worse than {reference}'s at any setting (above within seed noise at {', '.join(above)})"
        else:
            verdict = f"at or below {reference}'s at every setting"
        seeds = "; ".join(f"{s} " + ", ".join(f"{q:.2f}" for q in per_seed[s]) for s in SOLVERS)
        lines.append(f"- {ours} / {reference}, Fréchet distance: means "
                     f"{', '.join(f'{s} {q:.2f}' for s, q in mean.items())}; {verdict}. Per seed: {seeds}")
    return lines


def resampling_lines(summary: dict) -> list[str]:
    """For OT-CFM and I-CFM: the Fréchet distance and pixel W2 with pairs drawn with replacement over those
    without, ratios of the means at each solver setting."""
    lines = []
    for without, with_ in RESAMPLING_COMPARISONS:
        if without not in summary or with_ not in summary:
            continue
        for metric in ("frechet_distance", "w2"):
            ratios = ", ".join(f"{s} {summary[with_][s][metric][0] / summary[without][s][metric][0]:.2f}"
                               for s in SOLVERS)
            lines.append(f"- {with_} / {without}, {METRICS[metric]}: {ratios}")
    return lines


def field_error_lines(runs: list[dict], refs: dict) -> list[str]:
    """The I-CFM variants' field error at t = 0 against the exact field (``icfm_field_error``), mean ± std
    over seeds, beside the Fréchet distance of the exact field's one-step samples (all the mean image)."""
    cells = []
    for name in dict.fromkeys(r["variant"] for r in runs if "field_error_t0" in r):
        errors = [r["field_error_t0"] for r in runs if r["variant"] == name]
        cells.append(f"{name} {fmt((statistics.fmean(errors), statistics.stdev(errors) if len(errors) > 1 else 0.0), 4)}")
    if not cells:
        return []
    return [f"I-CFM's exact field at t = 0 is E[x1] - x0, and one Euler step of it sends every noise image to the mean "
            f"training image (Fréchet distance {refs['icfm_exact_one_step']:.1f}). Mean squared error per pixel of the "
            f"learned field at t = 0 against it, on the noise of the euler-1 column: {'; '.join(cells)}."]


def to_markdown(summary: dict, runs: list[dict], refs: dict, memo: dict | None, figures: list[str], args,
                command: str, wall: float, cpu: float) -> str:
    seeds = ", ".join(map(str, args.seeds))
    lines = ["# Digits: OT-CFM against I-CFM and torchcfm, unconditional and class-conditional", "",
             f"Command: `{command}`  ",
             f"Wall time: {wall:.0f} s in all on {args.cores} CPU core(s), one torch thread (torch {torch.__version__}, "
             f"{platform.python_implementation()} {platform.python_version()}); the process's own CPU time {cpu:.0f} s. "
             "The machine was shared with other processes during the run, so the wall times are upper bounds; on one "
             "thread, the CPU time is about what the run takes on an idle machine.", "",
             f"Data: scikit-learn's digits, {args.train_images} training and {args.held_out_images} held-out images "
             f"(8x8, in [-1, 1]). Model: ot-cfm MLP(64, width {args.width}, depth {args.depth}, time "
             f"{args.time_embedding}). {args.steps} steps of batch {args.batch_size}, lr {args.lr} ({warmup_steps(args.steps)} "
             f"warm-up steps, then cosine), grad clip 1, EMA {args.ema_decay}; seeds {seeds}: every variant of a "
             "seed starts from the same weights and draws the same noise, data and t (torchcfm draws t and its plan "
             f"itself). Conditional: label dropout {args.label_dropout}, guidance scale {args.guidance}, "
             f"labels 0..9 requested in turn. Metrics on {args.eval_samples} samples from fixed noise against the "
             f"{args.held_out_images} held-out images (pixel W2 on at most 1000 of each); Fréchet distance in the "
             f"features of the package's classifier ({args.classifier_steps} steps; held-out accuracy "
             f"{refs['classifier_held_out_accuracy']:.3f}). Mean ± sample standard deviation over seeds.", ""]
    for key, title in METRICS.items():
        conditional_only = key == "conditional_accuracy"
        names = [v.name for v in VARIANTS if v.name in summary and (v.conditional or not conditional_only)]
        if not names:
            continue
        lines += [f"## {title}", "", "| variant | " + " | ".join(SOLVERS) + " | dopri5 NFE |",
                  "| --- |" + " --- |" * (len(SOLVERS) + 1)]
        for name in names:
            cells = [fmt(summary[name][s][key]) if key in summary[name][s] else "n/a" for s in SOLVERS]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(summary[name]['dopri5']['nfe'], 0)} |")
        if key in refs:
            lines += ["", f"Reference: {refs['images']} training images against the held-out ones: {refs[key]:.3f}."]
        elif conditional_only:
            lines += ["", f"Reference: the classifier's accuracy on the held-out images, "
                          f"{refs['classifier_held_out_accuracy']:.3f}."]
        lines.append("")
    lines += ["## Goals (on the means)", "", *goal_lines(summary, runs), ""]
    resampled = resampling_lines(summary)
    if resampled:
        resampled += ["", *field_error_lines(runs, refs)]
        lines += ["## Pair sampling", "",
                  "Drawing a batch's pairs with replacement (about 37 % repeats, as torchcfm's plan sampler does) leaves "
                  "the expected loss unchanged and raises its variance, for independent pairs as for OT pairs. Ratios "
                  "of the means, with replacement over without (below 1: lower with replacement):", "", *resampled, ""]
    lines += ["## Wall time", "",
              "Per seed, means over seeds; wall seconds, and the CPU seconds of the process while it trained.", "",
              "| variant | training s | training CPU s | CPU ms per step | evaluation s |", "| --- | --- | --- | --- | --- |"]
    for v in VARIANTS:
        mine = [r for r in runs if r["variant"] == v.name]
        if not mine:
            continue
        train_s = statistics.fmean(r["train_seconds"] for r in mine)
        eval_s = statistics.fmean(r["eval_seconds"] for r in mine)
        cpu_s = statistics.fmean(r["train_cpu_seconds"] for r in mine)
        lines.append(f"| {v.name} | {train_s:.1f} | {cpu_s:.1f} | {1000 * cpu_s / args.steps:.2f} | {eval_s:.1f} |")
    if memo is not None:
        lines += memorisation_lines(memo, args)
    if figures:
        lines += ["", f"Figures: {', '.join(Path(p).name for p in figures)}."]
    return "\n".join(lines) + "\n"


def memorisation_lines(memo: dict, args) -> list[str]:
    """The memorisation section of the table: the exact field's fit and the distances of both sample sets."""
    lines = ["", "## Memorisation against the exact field", "",
              f"Exact field: `fit_discrete_potential` of the {args.train_images} training images (tol {args.fit_tol}, at "
              f"most {args.fit_max_time:g} s): TV {memo['fit_tv']:.4f} on fresh samples, converged "
              f"{memo['fit_converged']}, {memo['fit_seconds']:.0f} s. Its samples are training images whatever the TV; "
              "the TV says how far the share of noise sent to each training image is from uniform. "
              f"{memo['n']} noise images (seed {args.seeds[0]}) integrated by the exact field (Euler, "
              f"{memo['exact_nfe']} steps) and by the seed's OT-CFM model (dopri5). Distance: Euclidean, to the nearest "
              "training image; ratio: that distance over the training image's own nearest-neighbour distance.", "",
              "| samples | median distance | median ratio | share with ratio < 0.5 |", "| --- | --- | --- | --- |"]
    for which in ("learned", "exact"):
        m = memo[which]
        lines.append(f"| {which} | {m['median_distance']:.3f} | {m['median_ratio']:.3f} | {m['share_below_half']:.3f} |")
    return lines


def memorisation(model: nn.Module, data: ImageDataset, args, seed: int, out: Path) -> dict:
    """Fit the exact field of the training images, integrate it and the learned model from the same noise,
    measure both against the training set and draw the figure."""
    train = data.train_images
    flat = train.reshape(train.shape[0], -1).double()
    start = time.perf_counter()
    potential = fit_discrete_potential(flat, tol=args.fit_tol, max_time=args.fit_max_time, generator=seed,
                                       progress=False, threads=1)
    fit_seconds = time.perf_counter() - start
    x0 = torch.randn((args.memorisation_samples, *data.shape), generator=torch.Generator().manual_seed(seed + 30_000))
    exact_nfe = 4  # the exact field's paths are straight: Euler lands on T(x0) in any number of steps
    exact = sample(ExactVelocityField(potential), x0.reshape(x0.shape[0], -1).double(), solver="euler",
                   steps=exact_nfe).x.reshape(x0.shape).float()
    with torch.no_grad():
        learned, _ = sample_images(model, x0, None, 1.0, solver="dopri5", steps=None, max_nfe=1000)
    found = {name: memorisation_distances(images, train) for name, images in (("learned", learned), ("exact", exact))}
    figure = plot_memorisation(out / "digits_memorisation.png", learned, exact, train, found,
                               f"Memorisation: OT-CFM (seed {seed}, {args.steps} steps) against the exact field of the "
                               f"{train.shape[0]} training images, same noise")
    summary = {name: {"median_distance": float(f.distance.median()), "median_ratio": float(f.ratio.median()),
                      "share_below_half": float((f.ratio < 0.5).double().mean())} for name, f in found.items()}
    report = potential.fit_report
    return {"n": x0.shape[0], "exact_nfe": exact_nfe, "fit_tv": report.tv, "fit_converged": report.converged,
            "fit_seconds": fit_seconds, "figures": [str(figure)], **summary}


def plot_memorisation(path: Path, learned: torch.Tensor, exact: torch.Tensor, train: torch.Tensor, found: dict,
                      title: str) -> Path:
    """Three rows of the first ``MEMORISATION_SHOWN`` samples (learned, the training image nearest to each, exact)
    with distance d and ratio r under each tile, and a histogram of the ratios of all samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = MEMORISATION_SHOWN
    nearest = found["learned"].index[:k]
    rows = [("learned samples (dopri5)", learned[:k], found["learned"]),
            ("training image nearest to each learned sample", train[nearest], None),
            ("exact-field samples (same noise)", exact[:k], found["exact"])]
    fig = plt.figure(figsize=(11, 7.5))
    grid = fig.add_gridspec(len(rows), 2, width_ratios=(1.5, 1))
    size = train.shape[-1]
    for r, (name, images, dist) in enumerate(rows):
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(image_mosaic(images, k)[..., 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks([])
        centres = [1 + j * (size + 1) + (size - 1) / 2 for j in range(k)]
        if dist is None:
            ax.set_xticks(centres, [f"#{int(i)}" for i in nearest], fontsize=8)
        else:
            ax.set_xticks(centres, [f"d {d:.2f}\nr {q:.2f}" for d, q in zip(dist.distance[:k], dist.ratio[:k])],
                          fontsize=8)
        ax.tick_params(length=0)
        ax.set_title(name, fontsize=10)
    hist = fig.add_subplot(grid[:, 1])
    upper = max(float(found["learned"].ratio.max()), 1.0)
    bins = np.linspace(0.0, upper, 31)
    for name, colour in (("learned", "tab:blue"), ("exact", "tab:orange")):
        hist.hist(found[name].ratio.numpy(), bins=bins, alpha=0.6, color=colour,
                  label=f"{name} (median {float(found[name].ratio.median()):.2f})")
    hist.set_xlabel("ratio r = d / nearest-neighbour distance of\nthe nearest training image (d: distance to it)")
    hist.set_ylabel("samples")
    hist.set_title(f"ratio of all {learned.shape[0]} samples", fontsize=10)
    hist.legend()
    return save_figure(fig, path, title=title, dpi=90)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run (seconds): one seed, 150 steps, width 64, EMA 0.9, 200 evaluation samples, a short potential "
                        "fit, outputs in runs/digits_quick")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--time-embedding", choices=("concat", "sinusoidal"), default="concat")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale of conditional samples")
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--classifier-steps", type=int, default=ClassifierConfig().steps)
    p.add_argument("--fit-tol", type=float, default=0.01, help="TV tolerance of the exact field's potential fit")
    p.add_argument("--fit-max-time", type=float, default=900.0,
                   help="seconds the potential fit may take (its TV is reported; the exact field's samples are "
                        "training images whatever the TV, which says how evenly it weights them)")
    p.add_argument("--memorisation-samples", type=int, default=500)
    p.add_argument("--no-memorisation", dest="memorisation", action="store_false",
                   help="skip the exact field's fit and the memorisation figure")
    p.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], default=[v.name for v in VARIANTS],
                   metavar="NAME", help="the variants to train (default: all): " + "; ".join(v.name for v in VARIANTS))
    p.add_argument("--out", type=Path, default=Path("runs/digits"),
                   help="folder for digits.md, digits.json and the figures (the committed ones: examples/results)")
    return p


def run(argv=None) -> dict:
    """Train and evaluate every variant for every seed on one torch thread; write the table, the JSON, the figures."""
    with torch_threads(1):
        return _run(argv)


def _run(argv) -> dict:
    parser = build_parser()
    if parser.parse_known_args(argv)[0].quick:  # new defaults: flags given explicitly still win
        parser.set_defaults(seeds=[0], steps=150, width=64, ema_decay=0.9, eval_samples=200, classifier_steps=200, fit_tol=0.2,
                            fit_max_time=5.0, memorisation_samples=64, out=Path("runs/digits_quick"))
    args = parser.parse_args(argv)
    command = "python examples/digits.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    start, cpu_start = time.perf_counter(), time.process_time()
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_image_dataset("digits")
    args.train_images, args.held_out_images = data.train_images.shape[0], data.held_out_images.shape[0]
    args.cores = available_cores()
    classifier = load_or_train_classifier(data.train_images, data.train_labels, num_classes=data.num_classes,
                                          config=ClassifierConfig(steps=args.classifier_steps))
    refs = references(data, classifier, min(args.eval_samples, data.train_images.shape[0]))
    runs, figures, memo = [], [], None
    for seed in args.seeds:
        for variant in (v for v in VARIANTS if v.name in args.variants):
            cpu_tick = time.process_time()
            model, train_seconds = train(variant, data, args, seed)
            train_cpu, tick = time.process_time() - cpu_tick, time.perf_counter()
            _, rows = evaluate_image_model(model, data, classifier, n=args.eval_samples, conditional=variant.conditional,
                                       guidance=args.guidance, seed=seed)
            runs.append({"variant": variant.name, "seed": seed, "rows": rows, "train_seconds": train_seconds,
                         "train_cpu_seconds": train_cpu, "eval_seconds": time.perf_counter() - tick})
            if variant.pairing == "independent" and not variant.conditional:
                runs[-1]["field_error_t0"] = icfm_field_error(model, data, args.eval_samples, seed)
            fd = {r["solver"]: round(r["frechet_distance"], 3) for r in rows}
            print(f"seed {seed}, {variant.name}: trained in {train_seconds:.1f} s; Fréchet distance {fd}", flush=True)
            if seed == args.seeds[0] and variant.conditional:
                name = variant.name.split(",")[0].lower()
                figures.append(write_sample_grid(args.out / f"digits_grid_{name}.png", model, data.shape, data.num_classes,
                                           data.class_names, args.guidance, seed,
                                           f"digits, {variant.name} (seed {seed}, {args.steps} steps)"))
            if seed == args.seeds[0] and variant.name == "OT-CFM" and args.memorisation:
                memo = memorisation(model, data, args, seed, args.out)
    summary = summarise(runs)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    figures = [str(f) for f in figures] + (memo["figures"] if memo is not None else [])
    table = args.out / "digits.md"
    text = to_markdown(summary, runs, refs, memo, figures, args, command, wall, cpu)
    atomic_write(table, lambda f: f.write(text))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload = {"command": command, "settings": settings, "wall_seconds": wall, "cpu_seconds": cpu, "references": refs,
               "runs": runs,
               "summary": {v: {s: {k: list(pair) for k, pair in c.items()} for s, c in cells.items()}
                           for v, cells in summary.items()},
               "memorisation": memo, "figures": figures}
    atomic_write(args.out / "digits.json", lambda f: f.write(json.dumps(payload, indent=1, allow_nan=False) + "\n"))
    print(text)
    print(f"wrote {table}, {args.out / 'digits.json'}, " + ", ".join(figures))
    return {"table": table, "json": args.out / "digits.json", "figures": [Path(f) for f in figures],
            "summary": summary, "references": refs, "memorisation": memo, "wall_seconds": wall,
            "cpu_seconds": cpu}


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
