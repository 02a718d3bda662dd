"""The outputs of the batch-size study: the rows as CSV, the tables as markdown, the log-log figures.

``write_outputs`` writes into one folder ``batch_size.csv`` (one row per cell, timings left out so that a
resumed run writes the same file), ``batch_size.md`` (the targets and their fits, the fitted slopes, the
errors against B as mean ± std over seeds, and the trained models when there are any) and the figures
``batch_size_coupling.png``, ``batch_size_regression.png`` and ``batch_size_trained.png`` (the last two only
when their rows exist), every file written atomically.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ot_cfm.evaluation.plotting import save_figure
from ot_cfm.utils.atomic import atomic_write
from ot_cfm_experiments.batch_size.analysis import _group, _mean_std, _metrics, fit_slopes
from ot_cfm_experiments.batch_size.targets import Target

__all__ = ["write_outputs"]

#: number format of the CSV
_FLOAT_FORMAT = "{:.6g}"


def _csv_rows(rows: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """Columns and rows for the CSV: timings are left out, so a resumed run writes the same file."""
    columns = ["target", "dim", "coupler", "batch_size", "seed", "n_points", "n_batches", "train_steps"]
    columns += _metrics(rows, "coupling") + [m for m in _metrics(rows, "trained") if m not in columns]
    order = {"population": 0, "exact": 1, "sinkhorn": 2, "trained": 3}
    ordered = sorted(rows, key=lambda r: (r["target"], order[r["coupler"]], r["batch_size"] or math.inf, r["seed"]))
    out = []
    for r in ordered:
        row = {c: r.get(c, "") for c in columns}
        row["batch_size"] = "inf" if r["batch_size"] == 0 else r["batch_size"]
        out.append({c: _FLOAT_FORMAT.format(v) if isinstance(v, float) else v for c, v in row.items()})
    return columns, out


def _markdown(rows: Sequence[dict], targets: dict[str, Target], min_batch: int, header: str) -> str:
    lines = [header, ""]
    lines += ["## Targets", "",
              "Fitted potentials: TV cell-mass error 1/2 sum_j |mu0(C_j) - w_j| (with its sampling noise) and the "
              "relative width of its bracket on the OT cost (upper - lower) / upper, both as reported by "
              "`fit_discrete_potential`.", "",
              "| target | d | description | potential |", "| --- | --- | --- | --- |"]
    for name, target in targets.items():
        fit = target.fit
        quality = (f"fitted: TV {fit['tv']:.3g} (noise {fit['tv_noise']:.2g}), cost bracket "
                   f"{(fit['cost_upper_bound'] - fit['cost_lower_bound']) / fit['cost_upper_bound']:.2g}, {fit['seconds']:.0f} s"
                   if fit else "exact")
        note = target.note.replace("|", "\\|")
        lines.append(f"| {name} | {target.dim} | {note} | {quality} |")
    coupling = _metrics(rows, "coupling")
    lines += ["", f"## Fitted log-log slopes against B (exact coupler, B >= {min_batch})", "",
              "Slope of log(error) against log(B), least squares per seed; mean ± std over seeds (n seeds).", "",
              "| target | " + " | ".join(coupling) + " |", "| --- |" + " --- |" * len(coupling)]
    slopes = {m: fit_slopes(rows, m, min_batch=min_batch) for m in coupling}
    for name in targets:
        cells = []
        for m in coupling:
            s = slopes[m].get(name)
            cells.append("" if s is None else f"{_mean_std(s.tolist())} ({s.numel()})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Errors against B (mean ± std over seeds)", "",
              "B = inf pairs x0 with T(x0) through `SemidiscreteCoupler(potential)`: its coupling error is 0 by "
              "construction and its regression error checks `potential.velocity` against T(x0) - x0 on the exact "
              "path (round-off expected). For fitted targets the fit's own error (table above) sets the floor "
              "that the minibatch curves approach.", ""]
    lines += ["| target | coupler | B | seeds | " + " | ".join(coupling) + " |",
              "| --- | --- | --- | --- |" + " --- |" * len(coupling)]
    for name in targets:
        for coupler in ("exact", "sinkhorn", "population"):
            for b, group in _group(rows, target=name, coupler=coupler).items():
                values = [_mean_std([r[m] for r in group]) for m in coupling]
                lines.append(f"| {name} | {coupler} | {b or 'inf'} | {len(group)} | " + " | ".join(values) + " |")
    trained = [r for r in rows if r["coupler"] == "trained"]
    if trained:
        metrics = _metrics(rows, "trained")
        lines += ["", f"## Trained models (exact minibatch OT-CFM, {trained[0]['train_steps']} steps each)", "",
                  "| target | B | seeds | " + " | ".join(metrics) + " |", "| --- | --- | --- |" + " --- |" * len(metrics)]
        for name in targets:
            for b, group in _group(trained, target=name).items():
                values = [_mean_std([r[m] for r in group]) for m in metrics]
                lines.append(f"| {name} | {b} | {len(group)} | " + " | ".join(values) + " |")
        metrics = [m for m in metrics if m.startswith(("field_error", "w2_euler", "w2_dopri5", "npe"))]
        slopes = {m: fit_slopes(trained, m, coupler="trained", min_batch=1) for m in metrics}
        lines += ["", "Slopes against B of the trained metrics (all trained B; mean ± std over seeds):", "",
                  "| target | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
        for name in targets:
            if any(name in slopes[m] for m in metrics):
                cells = ["" if name not in slopes[m] else _mean_std(slopes[m][name].tolist()) for m in metrics]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: Sequence[dict], targets: dict[str, Target], metrics: Sequence[str], coupler_rows: str,
          path: Path, min_batch: int, title: str) -> None:
    """Log-log panels (one per target): mean over seeds, min-max band, fitted slope, Sinkhorn points, B = inf."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in targets if any(r["target"] == n and r["coupler"] == coupler_rows for r in rows)]
    if not names:
        return
    cols = min(4, len(names))
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(4.2 * cols, 3.4 * math.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        for k, m in enumerate(metrics):
            color = f"C{k}"
            groups = _group(rows, target=name, coupler=coupler_rows)
            sizes = [b for b in groups if all(r.get(m, 0) > 0 for r in groups[b])]
            if not sizes:
                continue
            values = torch.tensor([[r[m] for r in groups[b]] for b in sizes if len(groups[b]) == len(groups[sizes[0]])],
                                  dtype=torch.float64)
            sizes = sizes[:values.shape[0]]
            ax.fill_between(sizes, values.min(1).values, values.max(1).values, color=color, alpha=0.2, lw=0)
            slopes = fit_slopes(rows, m, coupler=coupler_rows, min_batch=min_batch if coupler_rows == "exact" else 1)
            label = m.replace("_error", "").replace("regression", "regr.")
            if name in slopes:
                spread = float(slopes[name].std()) if slopes[name].numel() > 1 else 0.0
                label += f" (slope {float(slopes[name].mean()):.2f} ± {spread:.2f})"
            ax.loglog(sizes, values.mean(1), "o-", color=color, ms=3, label=label)
            fitted = [b for b in sizes if b >= (min_batch if coupler_rows == "exact" else 1)]
            if name in slopes and len(fitted) >= 2:
                x = torch.tensor(fitted, dtype=torch.float64).log()
                y = values[len(sizes) - len(fitted):].mean(1).log()
                s = float(slopes[name].mean())
                ax.loglog(fitted, (y.mean() + s * (x - x.mean())).exp(), "--", color=color, lw=1)
            for extra, marker in (("sinkhorn", "s"), ("population", "_")):
                for b, group in _group(rows, target=name, coupler=extra).items():
                    mean = sum(r.get(m, 0) for r in group) / len(group)
                    if extra == "sinkhorn" and mean > 0:
                        ax.loglog([b], [mean], marker, mfc="none", color=color)
                    elif extra == "population" and mean > 1e-8:
                        ax.axhline(mean, color=color, ls=":", lw=1)
        ax.set_title(f"{name} (d = {targets[name].dim})")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("relative squared error")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=110)


def write_outputs(rows: Sequence[dict], targets: dict[str, Target], out: str | os.PathLike, *,
                  min_batch: int = 16, header: str = "# Batch-size convergence of minibatch OT-CFM") -> list[Path]:
    """Write ``batch_size.csv``, ``batch_size.md`` and the figures ``batch_size_*.png`` into ``out``; return the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns, csv_rows = _csv_rows(rows)
    paths = [out / "batch_size.csv", out / "batch_size.md"]

    def write_csv(f):
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(csv_rows)

    atomic_write(paths[0], write_csv)
    atomic_write(paths[1], lambda f: f.write(_markdown(rows, targets, min_batch, header)))
    # the note names only the marks the figures draw: Sinkhorn squares and B = inf lines when those rows exist
    drawn = [("sinkhorn", "squares: Sinkhorn coupler"),
             ("population", "dotted: B = inf, the population coupling (absent when 0 or at round-off, < 1e-8)")]
    note = "; ".join(["mean over seeds, band min-max; dashed: fitted slope"]
                     + [text for coupler, text in drawn if any(r["coupler"] == coupler for r in rows)])
    coupling = _metrics(rows, "coupling")
    figures = [("batch_size_coupling.png", [m for m in coupling if m.startswith("coupling")], "exact"),
               ("batch_size_regression.png", [m for m in coupling if m.startswith("regression")], "exact"),
               ("batch_size_trained.png", [m for m in _metrics(rows, "trained")
                                           if m.startswith(("field_error", "w2_euler", "w2_dopri5"))], "trained")]
    for name, metrics, coupler in figures:
        if any(r["coupler"] == coupler for r in rows):
            _plot(rows, targets, metrics, coupler, out / name, min_batch, note)
            paths.append(out / name)
    return paths

