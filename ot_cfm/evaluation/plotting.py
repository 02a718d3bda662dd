"""Figures: 2D flows (source, generated and target samples with ODE trajectories) and image sample grids."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ot_cfm.utils.atomic import atomic_write

__all__ = ["plot_flow_2d", "draw_trajectories", "plot_points_2d", "plot_image_grid", "image_mosaic", "save_figure", "figure_problems",
           "IncompleteFigureWarning"]


class IncompleteFigureWarning(UserWarning):
    """A saved figure lacks a title, an axis label, or a legend for several labelled series (the test suite
    turns this warning into an error, so every figure the package writes explains itself)."""


def figure_problems(fig) -> list[str]:
    """What a reader of ``fig`` would miss, one line per problem; empty when nothing is.

    Rules: the figure has a suptitle or every plotting panel has a title; every panel that draws data
    with its axes shown has an x and a y label (on it, or on a panel sharing that axis); a panel with two or
    more labelled series has a legend (its own or the figure's). Panels with their axes hidden (image
    grids) and colour bars are exempt from the labels.
    """
    problems = []
    suptitle = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) is not None else ""
    panels = [ax for ax in fig.axes if ax.get_visible() and not hasattr(ax, "_colorbar")]
    for i, ax in enumerate(panels):
        name = repr(ax.get_title()) if ax.get_title() else f"panel {i}"
        if not suptitle and not ax.get_title():
            problems.append(f"{name}: no title, and the figure has no suptitle")
        if ax.axison and (ax.lines or ax.collections or ax.patches):  # a panel of images alone has no axes to name
            for axis, siblings in (("x", ax.get_shared_x_axes().get_siblings(ax)),
                                   ("y", ax.get_shared_y_axes().get_siblings(ax))):
                if not any(getattr(a, f"get_{axis}label")() for a in siblings):
                    problems.append(f"{name}: no {axis} label")
        labelled = [a for a in [*ax.lines, *ax.collections, *ax.patches] if not a.get_label().startswith("_")]
        if len(labelled) >= 2 and ax.get_legend() is None and not fig.legends:
            problems.append(f"{name}: {len(labelled)} labelled series but no legend")
    return problems


def plot_flow_2d(path: str | Path, source: torch.Tensor, generated: torch.Tensor, target: torch.Tensor,
                 trajectory: torch.Tensor | None = None, *, title: str = "", max_paths: int = 300) -> Path:
    """Save a PNG with target samples, generated samples and (K, B, 2) trajectories starting from ``source``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, g, t = (a.detach().cpu() for a in (source, generated, target))
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True)
    axes[0].scatter(t[:, 0], t[:, 1], s=2, alpha=0.4, c="tab:green", label="target")
    axes[0].scatter(g[:, 0], g[:, 1], s=2, alpha=0.4, c="tab:blue", label="generated")
    axes[0].legend(loc="upper right", markerscale=4)
    axes[0].set_title("samples")
    if trajectory is not None:
        draw_trajectories(axes[1], trajectory[:, :max_paths], target=t)
    axes[1].set_title("trajectories")
    axes[0].set_xlabel("$x_1$")
    axes[0].set_ylabel("$x_2$")  # both panels share these axes
    for ax in axes:
        ax.set_aspect("equal")
    return save_figure(fig, path, title=title, dpi=120)


def draw_trajectories(ax, trajectory: torch.Tensor, *, target: torch.Tensor | None = None) -> None:
    """Draw (K, B, 2) ODE trajectories on ``ax``: paths as faint lines, start points x0 as small grey dots,
    end points x1 on top in blue; ``target`` samples (n, 2), when given, as a faint green background, so that
    the end points can be read against the shape they should form."""
    paths = trajectory.detach().cpu()
    if target is not None:
        t = target.detach().cpu()
        ax.scatter(t[:, 0], t[:, 1], s=2, alpha=0.15, c="tab:green", label="target", zorder=1)
    ax.plot(paths[:, :, 0], paths[:, :, 1], c="olive", alpha=0.15, lw=0.5, zorder=2)
    ax.scatter(paths[0, :, 0], paths[0, :, 1], s=2, c="0.55", label="x0 (start)", zorder=3)
    ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=5, c="tab:blue", label="x1 (end)", zorder=4)
    ax.legend(loc="upper right", markerscale=3)


def plot_points_2d(path: str | Path, points: torch.Tensor, labels: torch.Tensor | None = None, *,
                   title: str) -> Path:
    """Save a PNG scatter of points (n, 2) (for example the first two coordinates of samples), one colour and
    legend entry per class when labels (n,) are given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    p = points.detach().cpu()
    if labels is None:
        ax.scatter(p[:, 0], p[:, 1], s=3, alpha=0.5)
    else:
        labels = labels.cpu()
        for k in labels.unique().tolist():
            ax.scatter(p[labels == k, 0], p[labels == k, 1], s=3, alpha=0.5, label=f"class {k}")
        ax.legend(markerscale=4, fontsize=8)
    ax.set_xlabel("coordinate 1")
    ax.set_ylabel("coordinate 2")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi=120)


def image_mosaic(images: torch.Tensor, columns: int, *, pad: int = 1) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] tiled row by row into one (rows (H + pad) + pad, columns (W + pad) + pad, C)
    array in [0, 1], x -> (x + 1) / 2 clamped, with ``pad`` pixels of white between and around the tiles;
    rows = ceil(N / columns), a short last row is padded with white."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty batch (N, C, H, W), got {got}")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1 or pad < 0:
        raise ValueError(f"columns must be an integer >= 1 and pad >= 0, got columns={columns!r}, pad={pad!r}")
    n, c, h, w = images.shape
    rows = -(-n // columns)
    x = images.detach().to("cpu", torch.float32).add(1.0).div(2.0).clamp(0.0, 1.0)
    canvas = torch.ones(rows * (h + pad) + pad, columns * (w + pad) + pad, c)
    for k in range(n):
        top, left = pad + (k // columns) * (h + pad), pad + (k % columns) * (w + pad)
        canvas[top:top + h, left:left + w] = x[k].permute(1, 2, 0)
    return canvas


def plot_image_grid(path: str | Path, images: torch.Tensor, *, columns: int = 8, row_labels=None,
                    title: str = "", pad: int = 1) -> Path:
    """Save a PNG of images (N, C, H, W) in [-1, 1] (C = 1: grey, C = 3: RGB) tiled ``columns`` to a row.

    ``row_labels``: one label per row (e.g. the class each row was asked to show), written left of the
    rows; ``title``: the figure's title (say what the samples are: run, step, solver and NFE). The figure
    is sized to the grid and laid out so that title and labels stay inside it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mosaic = image_mosaic(images, columns, pad=pad).numpy()
    rows = -(-images.shape[0] // columns)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"got {len(row_labels)} row labels for {rows} rows of {columns} images; expected one per row")
    height, width = mosaic.shape[:2]
    scale = 6.0 / max(height, width)  # the longer side 6 inches
    fig, ax = plt.subplots(figsize=(max(3.5, width * scale + 1.0), height * scale + 0.9))
    grey = mosaic.shape[2] == 1
    ax.imshow(mosaic[..., 0] if grey else mosaic, cmap="gray" if grey else None, vmin=0.0, vmax=1.0,
              interpolation="nearest")
    ax.set_xticks([])
    h = images.shape[2]
    if row_labels is None:
        ax.set_yticks([])
    else:
        ax.set_yticks([pad + r * (h + pad) + (h - 1) / 2 for r in range(rows)], [str(v) for v in row_labels])
        ax.tick_params(axis="y", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, wrap=True)  # wrapped to the figure's width, never cut off
    return save_figure(fig, path, dpi=100)


def save_figure(fig, path: str | Path, *, title: str | None = None, dpi: int = 100) -> Path:
    """Set the suptitle when given, tighten the layout, save to ``path`` in the format its suffix names (creating its
    folder; atomically, never through a link at ``path``: ``ot_cfm.utils.atomic.atomic_write``), close ``fig``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title)
    problems = figure_problems(fig)
    if problems:
        warnings.warn(f"figure {path}: " + "; ".join(problems), IncompleteFigureWarning, stacklevel=2)
    fig.tight_layout()
    path = Path(path)
    try:  # bbox_inches="tight": nothing clipped, even with equal aspect
        atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:] or None, dpi=dpi, bbox_inches="tight",
                                                 pad_inches=0.1), binary=True)
    finally:
        plt.close(fig)
    return path
