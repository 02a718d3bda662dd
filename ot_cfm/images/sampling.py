"""Sampling and scoring image models: chunked sampling (guided when labelled), sample grids on fixed noise, and
the image metrics at each solver setting, as ``ot-cfm train --dataset`` and the image examples report them."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ot_cfm.evaluation import model_device, plotting
from ot_cfm.evaluation.metrics import wasserstein2
from ot_cfm.images import frechet
from ot_cfm.images.quality import evaluate_images
from ot_cfm.models import guided_field
from ot_cfm.solvers.ode import IntegrationError, sample

__all__ = ["IMAGE_EULER_NFES", "GRID_COLUMNS", "GRID_NFE", "EVAL_CHUNK", "PIXEL_W2_POINTS", "sample_images",
           "grid_noise", "evaluation_noise", "write_sample_grid", "evaluate_image_model"]

IMAGE_EULER_NFES = (1, 2, 4, 8)
GRID_COLUMNS = 8          # images per row of a sample grid; unconditional grids are 8 x 8
GRID_NFE = 8              # Euler steps of the sample grids (fixed, so frames of one run are comparable)
EVAL_CHUNK = 500          # images sampled per model call during evaluation and sampling
PIXEL_W2_POINTS = 1000    # pixel W2: at most this many generated and held-out images


def sample_images(model, x0: torch.Tensor, labels: torch.Tensor | None = None, guidance: float = 1.0, *,
                  solver: str, steps: int | None, **options) -> tuple[torch.Tensor, float]:
    """Integrate noise x0 (N, C, H, W) in chunks of ``EVAL_CHUNK`` on the model's device, with the model or, given
    labels (N,), its classifier-free guided field of scale ``guidance``; ``options`` go to ``ot_cfm.sample``.
    Returns (images (N, C, H, W) on the CPU, NFE); for an adaptive solver the NFE is the mean over the chunks."""
    device = model_device(model)
    images, nfes = [], []
    for start in range(0, x0.shape[0], EVAL_CHUNK):
        chunk = slice(start, start + EVAL_CHUNK)
        field = model if labels is None else guided_field(model, labels[chunk].to(device), guidance)
        out = sample(field, x0[chunk].to(device), solver=solver, steps=steps, **options)
        images.append(out.x.cpu())
        nfes.append(out.nfe)
    return torch.cat(images), sum(nfes) / len(nfes)


def grid_noise(shape: tuple, num_classes: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed noise (rows x ``GRID_COLUMNS``, *shape) of a run's sample grids, from ``seed``; when conditional,
    the labels too (one row per class)."""
    rows = GRID_COLUMNS if num_classes is None else num_classes
    x0 = torch.randn((rows * GRID_COLUMNS, *shape), generator=torch.Generator().manual_seed(seed + 20_000))
    labels = None if num_classes is None else torch.arange(num_classes).repeat_interleave(GRID_COLUMNS)
    return x0, labels


def write_sample_grid(path: str | Path, model, shape: tuple, num_classes: int | None, class_names, guidance: float,
                      seed: int, title: str) -> Path:
    """Sample the grid noise of ``seed`` with Euler (``GRID_NFE`` steps) and save it as a PNG, one row per class
    (named by ``class_names[k]``) when conditional."""
    x0, labels = grid_noise(shape, num_classes, seed)
    with torch.no_grad():
        images, nfe = sample_images(model, x0, labels, guidance, solver="euler", steps=GRID_NFE)
    rows = None if num_classes is None else [class_names[k] for k in range(num_classes)]
    suffix = "" if num_classes is None else f", guidance {guidance:g}, one row per class"
    return plotting.plot_image_grid(path, images, columns=GRID_COLUMNS, row_labels=rows,
                           title=f"{title}, Euler NFE {nfe:g}{suffix}")


def evaluation_noise(n: int, shape: tuple, seed: int) -> torch.Tensor:
    """The fixed noise (n, *shape), on the CPU, that ``evaluate_image_model`` samples from for ``seed``."""
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed + 10_000))


def evaluate_image_model(model, data, classifier, *, n: int, conditional: bool, guidance: float, seed: int,
                         adaptive: bool = True, euler_nfes=IMAGE_EULER_NFES,
                         inception_weights: str | None = None) -> tuple[dict, list[dict]]:
    """Image metrics of ``model`` at each solver setting (Euler at ``euler_nfes``, then dopri5), on fixed noise
    (``seed``) against ``data.held_out_images`` (an ``ImageDataset``): ``evaluate_images`` with
    ``classifier``, pixel W2 and, with ``inception_weights``, the Inception FID.

    Returns (metrics keyed "<metric>/<solver>", one table row per solver). Conditional samples request the
    labels arange(n) mod K, and their classifier accuracy is reported. A solver that fails (an undertrained
    field can stiffen dopri5) gets null metrics and a warning.
    """
    x0 = evaluation_noise(n, data.shape, seed)
    labels = torch.arange(n) % data.num_classes if conditional else None
    held_out = data.held_out_images
    metrics, rows = {}, []
    settings = [(f"euler-{k}", "euler", k) for k in euler_nfes] + ([("dopri5", "dopri5", None)] if adaptive else [])
    for name, solver, steps in settings:
        options = {"max_nfe": 1000} if steps is None else {}
        try:
            with torch.no_grad():
                images, nfe = sample_images(model, x0, labels, guidance, solver=solver, steps=steps, **options)
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
