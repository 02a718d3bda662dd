"""Reading the rows of the batch-size study: log-log slopes against B, and the row helpers of the report.

A row is one measured cell: its fields (target, coupler, batch_size with 0 for B = inf, seed, dim, seconds)
and its metrics. ``fit_slopes`` fits log(metric) = a + s log(B) by least squares per (target, seed); an error
that decays like B^-r has slope s = -r.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["fit_slopes"]


def fit_slopes(rows: Sequence[dict], metric: str, *, coupler: str = "exact", min_batch: int = 16) -> dict:
    """Least-squares slope of log(metric) against log(B) per (target, seed), over B >= min_batch.

    Returns ``{target: tensor of per-seed slopes}`` (float64); seeds with fewer than two positive values are skipped.
    """
    series: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in rows:
        value = r.get(metric)
        if r["coupler"] == coupler and r["batch_size"] >= min_batch and value is not None and value > 0:
            series.setdefault((r["target"], r["seed"]), []).append((math.log(r["batch_size"]), math.log(value)))
    slopes: dict[str, list[float]] = {}
    for (name, _), points in sorted(series.items()):
        if len(points) < 2:
            continue
        x, y = torch.tensor(points, dtype=torch.float64).T
        xc = x - x.mean()
        slopes.setdefault(name, []).append(float((xc * (y - y.mean())).sum() / xc.square().sum()))
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in slopes.items()}


def _metrics(rows: Sequence[dict], kind: str) -> list[str]:
    """The metric names of the "trained" rows (``kind`` "trained") or of the coupler rows (any other), in first-seen order."""
    skip = {"target", "coupler", "batch_size", "seed", "dim", "seconds", "n_points", "n_batches", "train_steps"}
    names: list[str] = []
    for r in rows:
        if (r["coupler"] == "trained") == (kind == "trained"):
            names += [k for k in r if k not in skip and k not in names]
    return names


def _mean_std(values: Sequence[float]) -> str:
    """``values`` as "mean ± std" (sample std; 3 and 2 significant digits), or the single value alone."""
    v = torch.tensor(values, dtype=torch.float64)
    if v.numel() == 1:
        return f"{float(v[0]):.3g}"
    return f"{float(v.mean()):.3g} ± {float(v.std()):.2g}"


def _group(rows: Sequence[dict], **where) -> dict[int, list[dict]]:
    """The rows whose fields equal ``where``, by batch size in increasing order (0, that is B = inf, last)."""
    out: dict[int, list[dict]] = {}
    for r in rows:
        if all(r[k] == v for k, v in where.items()):
            out.setdefault(r["batch_size"], []).append(r)
    return dict(sorted(out.items(), key=lambda kv: kv[0] if kv[0] else math.inf))

