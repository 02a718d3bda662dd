"""Figures for 2D flows: source, generated and target samples with ODE trajectories."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["plot_flow_2d", "save_figure"]


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
        paths = trajectory.detach().cpu()[:, :max_paths]
        axes[1].plot(paths[:, :, 0], paths[:, :, 1], c="olive", alpha=0.2, lw=0.6)
        axes[1].scatter(paths[0, :, 0], paths[0, :, 1], s=3, c="black", label="x0")
        axes[1].scatter(paths[-1, :, 0], paths[-1, :, 1], s=3, c="tab:blue", label="x1")
        axes[1].legend(loc="upper right", markerscale=4)
    axes[1].set_title("trajectories")
    for ax in axes:
        ax.set_aspect("equal")
    return save_figure(fig, path, title=title, dpi=120)


def save_figure(fig, path: str | Path, *, title: str | None = None, dpi: int = 100) -> Path:
    """Set the suptitle when given, tighten the layout, save to ``path`` (creating its folder), close ``fig``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
