"""Sampling and scoring image models: chunked sampling (guided when labelled), sample grids on fixed noise, the
image metrics at each solver setting, as ``ot-cfm train --dataset`` and the image examples report them, and the
choice of evaluation that keeps its cost a bounded share of the training run (``plan_evaluation``).

Each phase shows a progress bar (tqdm) counted in image-NFE (one image through one field evaluation), so that its
time left is estimated from the start: exact for fixed-step solvers, an upper bound (the NFE cap) for adaptive ones.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ot_cfm.evaluation import model_device, plotting
from ot_cfm.evaluation.metrics import wasserstein2
from ot_cfm.images import frechet
from ot_cfm.images.quality import evaluate_images
from ot_cfm.models import guided_field
from ot_cfm.solvers.ode import IntegrationError, sample

__all__ = ["IMAGE_EULER_NFES", "IMAGE_SETTINGS", "GRID_COLUMNS", "GRID_NFE", "EVAL_CHUNK", "PIXEL_W2_POINTS",
           "EVAL_MAX_NFE", "EVAL_SHARE", "EvaluationPlan", "plan_evaluation", "parse_settings", "sample_images",
           "grid_noise", "evaluation_noise", "write_sample_grid", "evaluate_image_model"]

IMAGE_EULER_NFES = (1, 2, 4, 8)
#: the full evaluation: Euler at ``IMAGE_EULER_NFES``, then dopri5 (capped at ``EVAL_MAX_NFE``)
IMAGE_SETTINGS = tuple(f"euler-{k}" for k in IMAGE_EULER_NFES) + ("dopri5",)
EVAL_MAX_NFE = 200        # NFE cap of adaptive solvers in evaluations (a trained image field needs 30 to 100)
EVAL_SHARE = 0.25         # the default evaluation costs at most about this share of training's model evaluations
_DOPRI5_NFE_ESTIMATE = 50  # dopri5's typical NFE, for planning; the cap bounds the worst case at 4x
_GOOD_SAMPLES = 500       # a plan keeps this many samples before it keeps more settings
_MIN_SAMPLES = 100        # fewest samples of a default evaluation (Fréchet distances below ~500 are noisy)
_MAX_SAMPLES = 2000
_SETTING = re.compile(r"(euler|midpoint)-([1-9][0-9]*)|dopri5|tsit5")
GRID_COLUMNS = 8          # images per row of a sample grid; unconditional grids are 8 x 8
GRID_NFE = 8              # Euler steps of the sample grids (fixed, so frames of one run are comparable)
EVAL_CHUNK = 500          # images sampled per model call during evaluation and sampling
PIXEL_W2_POINTS = 1000    # pixel W2: at most this many generated and held-out images


class _CountedField:
    """field(t, x), advancing a progress bar by the batch size at each evaluation (its unit: image-NFE)."""

    def __init__(self, field, bar):
        self.field, self.bar = field, bar

    def __call__(self, t, x):
        self.bar.update(x.shape[0])
        return self.field(t, x)


def sample_images(model, x0: torch.Tensor, labels: torch.Tensor | None = None, guidance: float = 1.0, *,
                  solver: str, steps: int | None, progress=None, **options) -> tuple[torch.Tensor, float]:
    """Integrate noise x0 (N, C, H, W) in chunks of ``EVAL_CHUNK`` on the model's device, with the model or, given
    labels (N,), its classifier-free guided field of scale ``guidance``; ``options`` go to ``ot_cfm.sample``.
    ``progress``, a tqdm bar, advances by the images of each field evaluation; for an adaptive solver its total
    becomes, after each chunk, what is done plus the rest at that chunk's NFE.
    Returns (images (N, C, H, W) on the CPU, NFE); for an adaptive solver the NFE is the mean over the chunks."""
    device = model_device(model)
    images, nfes = [], []
    for start in range(0, x0.shape[0], EVAL_CHUNK):
        chunk = slice(start, start + EVAL_CHUNK)
        field = model if labels is None else guided_field(model, labels[chunk].to(device), guidance)
        if progress is not None:
            field = _CountedField(field, progress)
        out = sample(field, x0[chunk].to(device), solver=solver, steps=steps, **options)
        images.append(out.x.cpu())
        nfes.append(out.nfe)
        if progress is not None and steps is None:  # adaptive: the rest will take about this chunk's NFE
            progress.total = progress.n + (x0.shape[0] - start - out.x.shape[0]) * out.nfe
            progress.refresh()
    return torch.cat(images), sum(nfes) / len(nfes)


def parse_settings(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """Solver settings from "euler-1,euler-8,dopri5" (or a tuple of such names): ``euler-K`` and ``midpoint-K``
    (K steps), ``dopri5`` and ``tsit5`` (adaptive, capped at ``EVAL_MAX_NFE``). ValueError naming a bad one."""
    names = tuple(n.strip() for n in (text.split(",") if isinstance(text, str) else text))
    bad = [n for n in names if not _SETTING.fullmatch(n)]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"solver settings must be distinct names like euler-1, euler-8, midpoint-4, dopri5 or tsit5, "
                         f"separated by commas; got {text!r}" + (f" ({', '.join(map(repr, bad))} not understood)" if bad else ""))
    return names


def _solver_and_nfe(setting: str) -> tuple[str, int | None, int]:
    """(solver, steps or None, the NFE to plan with): midpoint takes 2 evaluations a step."""
    match = _SETTING.fullmatch(setting)
    if match.group(1) is None:
        return setting, None, _DOPRI5_NFE_ESTIMATE
    steps = int(match.group(2))
    return match.group(1), steps, steps * (2 if match.group(1) == "midpoint" else 1)


@dataclass(frozen=True)
class EvaluationPlan:
    """What an evaluation after training samples: ``n`` images at each of ``settings`` (solver names as
    ``parse_settings`` reads them); ``share``: its planned model evaluations over training's, in images
    (a training step costs about three forwards per image: forward and backward); ``reason``: how it was chosen."""

    n: int
    settings: tuple[str, ...]
    share: float
    reason: str

    def describe(self) -> str:
        return (f"evaluation: {self.n} samples at {', '.join(self.settings)} (about {self.share:.0%} of training's "
                f"model evaluations; {self.reason})")


def plan_evaluation(steps: int, batch_size: int, *, samples: int | None = None,
                    settings: str | tuple[str, ...] | None = None) -> EvaluationPlan:
    """Choose the evaluation after a training run of ``steps`` x ``batch_size`` images so that it costs a bounded
    share of the run, independently of the machine (so a run's metrics do not depend on its speed).

    Training evaluates the model about 3 x steps x batch_size times per image (forward and backward); an
    evaluation with n samples at settings of total NFE S costs n x S. Without ``samples`` and ``settings`` the plan
    is the first of: all of ``IMAGE_SETTINGS``; Euler at 1, 2, 4, 8; Euler at 1 and 8; that keeps at least 500
    samples within ``EVAL_SHARE`` of training (n = EVAL_SHARE x 3 x steps x batch_size / S, at most 2000). A run
    too short for any of them gets Euler at 1 and 8 with 100 samples (over the share; said in ``reason``).
    ``samples`` or ``settings`` given fix that part; the other is still chosen.
    """
    budget = EVAL_SHARE * 3 * steps * batch_size
    if settings is not None:
        candidates = [parse_settings(settings)]
    else:
        candidates = [IMAGE_SETTINGS, tuple(f"euler-{k}" for k in IMAGE_EULER_NFES), ("euler-1", "euler-8")]

    def cost(names):
        return sum(_solver_and_nfe(name)[2] for name in names)

    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"the number of evaluation samples must be an integer >= 1, got {samples!r}")
        chosen = next((c for c in candidates if samples * cost(c) <= budget), candidates[-1])
        reason = "--eval-samples given" + ("" if settings is None else ", settings given")
        return EvaluationPlan(samples, chosen, samples * cost(chosen) / (3 * steps * batch_size), reason)
    for names in candidates:
        n = min(_MAX_SAMPLES, math.floor(budget / cost(names)))
        if n >= _GOOD_SAMPLES or (settings is not None and n >= _MIN_SAMPLES):
            reason = "settings given" if settings is not None else f"the most settings that keep >= {_GOOD_SAMPLES} samples"
            return EvaluationPlan(n, names, n * cost(names) / (3 * steps * batch_size), reason)
    names = candidates[-1]
    return EvaluationPlan(_MIN_SAMPLES, names, _MIN_SAMPLES * cost(names) / (3 * steps * batch_size),
                          f"the run is too short for {EVAL_SHARE:.0%}: the fewest samples and settings; "
                          f"Fréchet distances of {_MIN_SAMPLES} samples are noisy")


def grid_noise(shape: tuple, num_classes: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed noise (rows x ``GRID_COLUMNS``, *shape) of a run's sample grids, from ``seed``; when conditional,
    the labels too (one row per class)."""
    rows = GRID_COLUMNS if num_classes is None else num_classes
    x0 = torch.randn((rows * GRID_COLUMNS, *shape), generator=torch.Generator().manual_seed(seed + 20_000))
    labels = None if num_classes is None else torch.arange(num_classes).repeat_interleave(GRID_COLUMNS)
    return x0, labels


def write_sample_grid(path: str | Path, model, shape: tuple, num_classes: int | None, class_names, guidance: float,
                      seed: int, title: str, *, progress: bool = True) -> Path:
    """Sample the grid noise of ``seed`` with Euler (``GRID_NFE`` steps) and save it as a PNG, one row per class
    (named by ``class_names[k]``) when conditional."""
    x0, labels = grid_noise(shape, num_classes, seed)
    with torch.no_grad(), tqdm(total=x0.shape[0] * GRID_NFE, desc="sample grid", unit=" image-NFE",
                                disable=not progress, dynamic_ncols=True) as bar:
        images, nfe = sample_images(model, x0, labels, guidance, solver="euler", steps=GRID_NFE, progress=bar)
    rows = None if num_classes is None else [class_names[k] for k in range(num_classes)]
    suffix = "" if num_classes is None else f", guidance {guidance:g}, one row per class"
    return plotting.plot_image_grid(path, images, columns=GRID_COLUMNS, row_labels=rows,
                           title=f"{title}, Euler NFE {nfe:g}{suffix}")


def evaluation_noise(n: int, shape: tuple, seed: int) -> torch.Tensor:
    """The fixed noise (n, *shape), on the CPU, that ``evaluate_image_model`` samples from for ``seed``."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed + 10_000))


def evaluate_image_model(model, data, classifier, *, n: int, conditional: bool, guidance: float, seed: int,
                         settings: tuple[str, ...] = IMAGE_SETTINGS, inception_weights: str | None = None,
                         progress: bool = True) -> tuple[dict, list[dict]]:
    """Image metrics of ``model`` at each solver setting (``parse_settings`` names; adaptive ones capped at
    ``EVAL_MAX_NFE``), on fixed noise (``seed``) against ``data.held_out_images`` (an ``ImageDataset``):
    ``evaluate_images`` with ``classifier``, pixel W2 and, with ``inception_weights``, the Inception FID.

    Returns (metrics keyed "<metric>/<setting>", one table row per setting). Conditional samples request the
    labels arange(n) mod K, and their classifier accuracy is reported. A solver that fails (an undertrained
    field can stiffen dopri5) gets null metrics and a warning. ``progress`` shows a bar per setting.
    """
    x0 = evaluation_noise(n, data.shape, seed)
    labels = torch.arange(n) % data.num_classes if conditional else None
    held_out = data.held_out_images
    metrics, rows = {}, []
    for name in parse_settings(settings):
        solver, steps, planned = _solver_and_nfe(name)
        options = {"max_nfe": EVAL_MAX_NFE} if steps is None else {}
        bound = n * (EVAL_MAX_NFE if steps is None else planned)  # adaptive: the cap, an upper bound
        try:
            with torch.no_grad(), tqdm(total=bound, desc=f"evaluate {name} ({n} images)", unit=" image-NFE",
                                       disable=not progress, dynamic_ncols=True) as bar:
                images, nfe = sample_images(model, x0, labels, guidance, solver=solver, steps=steps, progress=bar,
                                            **options)
        except IntegrationError as err:
            warnings.warn(f"{name}: no samples ({err}); its metrics are null", RuntimeWarning, stacklevel=2)
            metrics.update({f"frechet_distance/{name}": None, f"nfe/{name}": None})
            continue
        quality = evaluate_images(images, held_out, classifier, requested_labels=labels)
        w2 = wasserstein2(images[:PIXEL_W2_POINTS], held_out[:PIXEL_W2_POINTS])
        row = {"nfe": float(nfe), "w2": w2, **quality.as_dict()}
        if inception_weights is not None:
            row["fid"] = frechet.inception_fid(images, held_out, inception_weights=inception_weights).value
        metrics.update({f"{k}/{name}": v for k, v in row.items()})
        rows.append({"solver": name, **row})
    return metrics, rows
