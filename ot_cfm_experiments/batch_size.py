"""Batch-size convergence of minibatch OT-CFM to the population OT-CFM (DESIGN.md section 1).

Minibatch OT-CFM pairs B source points x0 ~ N(0, I_d) with B target points x1 by exact OT.
Against the Brenier map T of the target (closed form, or fitted by ``fit_discrete_potential``)
each cell (target, coupler, B, seed) measures, over about ``n_eval`` points:

    coupling error    E |x1_B(x0) - T(x0)|^2 / E |x1 - x0|^2     (denominator: independent pairs)
    regression error  E |(x1 - x0) - u_t(x_t)|^2 / E |u_t(x_t)|^2,   x_t = (1 - t) x0 + t x1

with (x0, x1) the coupler's pairs and u_t the exact field ``potential.velocity``. B = inf is the
population coupling ``SemidiscreteCoupler(potential)``. For B = 1 and a Gaussian target N(m, S),
x1 and T(x0) are independent copies of N(m, S): the coupling error is 2 tr(S) / (|m|^2 + tr(S) + d).
Optionally a model is trained per (target, B, seed) with ``Trainer`` and scored by ``field_error``
and ``evaluate_samples``. Cells are cached as JSON files, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.couplers.semidiscrete import SemidiscreteCoupler
from ot_cfm.couplers.sinkhorn import SinkhornCoupler
from ot_cfm.data import TensorSampler, gaussian_sampler, load_digits, toy_sampler
from ot_cfm.evaluation import evaluate_samples
from ot_cfm.evaluation.plotting import save_figure
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import TrainConfig, Trainer
from ot_cfm.training.batches import DATA_STREAM
from ot_cfm.utils.atomic import atomic_write, save_torch
from proximal.discrete import DiscreteBrenierPotential
from proximal.field import field_error
from proximal.gaussian import GaussianPotential
from proximal.grid import GridPotential
from proximal.potential import BrenierPotential
from proximal.semidiscrete import fit_discrete_potential
from proximal.sphere import SpherePotential

__all__ = ["TARGETS", "TRAINABLE", "Target", "Cell", "ExperimentConfig", "make_target", "measure_cell",
           "run_experiment", "fit_slopes", "write_outputs", "main"]

#: targets with an exact (closed-form) or fitted Brenier potential
TARGETS = ("gauss2", "gauss8", "gauss32", "sphere", "grid", "moons", "digits")
#: targets of the trained-model subset (2D toys and the d = 8 Gaussian)
TRAINABLE = ("gauss2", "grid", "moons", "gauss8")
#: number format of the CSV
_FLOAT_FORMAT = "{:.6g}"


@dataclass
class Target:
    """A target measure with its potential: ``sample(n, generator) -> (n, dim)``; ``note`` describes it."""

    name: str
    potential: BrenierPotential
    sample: Callable[[int, torch.Generator], torch.Tensor]
    note: str
    fit: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.potential.dim


@dataclass(frozen=True)
class Cell:
    """One measurement: coupler "exact", "sinkhorn", "population" (B = inf, batch_size 0) or "trained"."""

    target: str
    coupler: str
    batch_size: int
    seed: int

    @property
    def key(self) -> str:
        size = "inf" if self.batch_size == 0 else str(self.batch_size)
        return f"{self.target}__{self.coupler}__B{size}__seed{self.seed}"

    def generator(self) -> torch.Generator:
        """A CPU generator seeded from (target, coupler, B, seed) alone, so cells do not depend on order."""
        return torch.Generator().manual_seed(zlib.crc32(self.key.encode()))


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that decides the cells' values (part of each cached cell: a change recomputes it)."""

    n_eval: int = 4096
    max_batches: int = 256
    times: tuple[float, ...] = (0.1, 0.5, 0.9)
    epsilon: float = 1e-2
    sinkhorn_max_iters: int = 5000
    train_steps: int = 200
    train_lr: float = 1e-3
    train_width: int = 64
    train_eval_n: int = 1000
    moons_points: int = 1000
    fit_seconds: float = 90.0


# -- targets ----------------------------------------------------------------------------------


def _gaussian_target(dim: int) -> Target:
    """N(m, S) with S = Q diag(lambda) Q^T, lambda log-spaced in [0.1, 4], Q and m (|m| ~ 1) seeded by dim."""
    g = torch.Generator().manual_seed(1000 + dim)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(math.log10(0.1), math.log10(4.0), dim, dtype=torch.float64)
    cov = (q * eigenvalues) @ q.T
    cov = (cov + cov.T) / 2
    mean = torch.randn(dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    potential = GaussianPotential(mean.float(), cov.float())
    return Target(f"gauss{dim}", potential, _pushforward(potential),
                  f"N(m, S) in d = {dim}, eigenvalues of S log-spaced in [0.1, 4], |m| = {float(mean.norm()):.2f}")


def _pushforward(potential: BrenierPotential) -> Callable[[int, torch.Generator], torch.Tensor]:
    """Target sampler ``T(z)``, z ~ N(0, I) fresh: exact for every closed-form potential."""
    source = gaussian_sampler((potential.dim,))
    return lambda n, generator: potential.transport_map(source(n, generator))


def _fitted_target(name: str, support: torch.Tensor, cache_dir: Path, config: ExperimentConfig,
                   note: str) -> Target:
    """Uniform measure on ``support`` (N, d) with duals from ``fit_discrete_potential``, cached on disk."""
    path = cache_dir / f"potential_{name}_N{support.shape[0]}_t{config.fit_seconds:g}.pt"
    state = torch.load(path, weights_only=True) if path.exists() else None
    if state is not None and "cost_upper_bound" in state["fit"]:  # older caches lack the cost bracket: refit
        potential = DiscreteBrenierPotential(state["support"], None, state["dual_weights"])
        fit = state["fit"]
    else:
        potential = fit_discrete_potential(support, tol=1e-2, max_time=config.fit_seconds, generator=0,
                                           progress=False)
        report = potential.fit_report
        fit = {"tv": report.tv, "tv_noise": report.tv_noise, "converged": report.converged,
               "seconds": report.seconds, "map_cost": report.map_cost, "cost_lower_bound": report.cost_lower_bound,
               "cost_upper_bound": report.cost_upper_bound}
        save_torch(path, {"support": support, "dual_weights": potential.dual_weights, "fit": fit})
    return Target(name, potential, TensorSampler(support), note, fit)


def make_target(name: str, *, cache_dir: str | os.PathLike, config: ExperimentConfig = ExperimentConfig()) -> Target:
    """The target ``name`` (one of TARGETS); fitted potentials are read from / written to ``cache_dir``."""
    cache_dir = Path(cache_dir)
    if name in ("gauss2", "gauss8", "gauss32"):
        return _gaussian_target(int(name[5:]))
    if name == "sphere":
        potential = SpherePotential(1.0, dim=3)
        return Target(name, potential, _pushforward(potential), "uniform on the unit sphere S^2 in R^3")
    if name == "grid":
        points = [torch.linspace(-2.0, 2.0, 5), torch.tensor([-1.5, -0.5, 0.0, 1.0, 2.5])]
        weights = [torch.tensor([1.0, 2.0, 3.0, 2.0, 1.0]) / 9, torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])]
        potential = GridPotential(points, weights)
        return Target(name, potential, _pushforward(potential), "tensor grid of 5 x 5 atoms in R^2, product weights")
    if name == "moons":
        support = toy_sampler("moons")(config.moons_points, torch.Generator().manual_seed(0))
        return _fitted_target(name, support, cache_dir, config,
                              f"{config.moons_points} i.i.d. moons points (toy scale, not standardised), fitted potential")
    if name == "digits":
        images, _ = load_digits()
        return _fitted_target(name, images.flatten(1), cache_dir, config,
                              "scikit-learn digits, 1797 x 64 pixels scaled to [-1, 1], fitted potential")
    raise ValueError(f"unknown target {name!r}; expected one of {TARGETS}")


# -- one cell ---------------------------------------------------------------------------------


def _coupler(cell: Cell, target: Target, config: ExperimentConfig):
    if cell.coupler == "exact":
        return ExactOTCoupler()
    if cell.coupler == "sinkhorn":
        return SinkhornCoupler(epsilon=config.epsilon, max_iters=config.sinkhorn_max_iters)
    if cell.coupler == "population":
        return SemidiscreteCoupler(target.potential)
    raise ValueError(f"unknown coupler {cell.coupler!r}")


@torch.no_grad()
def _measure_coupling(cell: Cell, target: Target, config: ExperimentConfig) -> dict:
    """Coupling and regression-target errors of one cell, as ratios of sums over all its batches."""
    generator = cell.generator()
    coupler = _coupler(cell, target, config)
    interpolant = ConditionalFlowMatcher(coupler=None, sigma=0.0)
    source = gaussian_sampler((target.dim,))
    size = config.n_eval if cell.batch_size == 0 else cell.batch_size
    batches = max(1, min(config.max_batches, math.ceil(config.n_eval / size)))
    x0, x1 = source(batches * size, generator), target.sample(batches * size, generator)
    independent = float((x1 - x0).square().sum(dtype=torch.float64))
    pairs = [coupler.pair(a, b, generator=generator) for a, b in zip(x0.split(size), x1.split(size))]
    x0, x1 = torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])
    coupled = float((x1 - target.potential.transport_map(x0)).square().sum(dtype=torch.float64))
    residual, scale = [], []
    for t in config.times:
        s = interpolant.sample(x0, x1, t, generator=generator)
        exact = target.potential.velocity(s.x_t, t)
        residual.append(float((s.u_t - exact).square().sum(dtype=torch.float64)))
        scale.append(float(exact.square().sum(dtype=torch.float64)))
    out = {"n_points": batches * size, "n_batches": batches, "coupling_error": coupled / independent}
    out.update({f"regression_error_t{t:g}": r / s for t, r, s in zip(config.times, residual, scale)})
    return out


def _init_mlp(model: torch.nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from ``generator``."""
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            bound = 1 / math.sqrt(layer.in_features)
            torch.nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
            torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def _measure_trained(cell: Cell, target: Target, config: ExperimentConfig) -> dict:
    """Train an MLP with minibatch OT-CFM at batch size B, then its field error, W2 per NFE and NPE."""
    generator = cell.generator()
    model = MLP(target.dim, width=config.train_width)
    _init_mlp(model, generator)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=generator))
    train = TrainConfig(steps=config.train_steps, batch_size=cell.batch_size, lr=config.train_lr, seed=seed,
                        log_every=config.train_steps, checkpoint_every=config.train_steps, progress=False,
                        workers=0)  # hundreds of 200-step fits: worker start-up would cost more than it hides
    trainer = Trainer(model, ConditionalFlowMatcher(ExactOTCoupler(), sigma=0.0), gaussian_sampler((target.dim,)),
                      target.sample, train)
    result = trainer.fit()
    model = trainer.sampling_model.eval()
    errors = field_error(model, target.potential, config.times, config.train_eval_n, generator=generator)
    quality, _ = evaluate_samples(model, gaussian_sampler((target.dim,)), target.sample, n=config.train_eval_n,
                                  euler_nfes=(1, 2, 4), adaptive=True, generator=generator)
    out = {"n_points": config.train_eval_n, "train_steps": config.train_steps, "train_loss": result.loss}
    out.update({f"field_error_t{t:g}": float(e) for t, e in zip(config.times, errors.errors)})
    out.update({f"w2_{k}": v for k, v in quality.w2.items()})
    out.update(nfe_dopri5=quality.nfe.get("dopri5", float("nan")), npe=quality.npe, w2_floor=quality.w2_floor)
    return out


def measure_cell(cell: Cell, target: Target, config: ExperimentConfig = ExperimentConfig()) -> dict:
    """The metrics of one cell as a flat dict of numbers (see the module docstring)."""
    if cell.coupler == "trained":
        return _measure_trained(cell, target, config)
    return _measure_coupling(cell, target, config)


# -- running, caching -------------------------------------------------------------------------


def _cell_spec(cell: Cell, target: Target, config: ExperimentConfig) -> dict:
    spec = {"cell": asdict(cell), "config": asdict(config), "target_note": target.note}
    if target.fit:  # identifies a fitted potential: a refit (another solver, another budget) gives other cells
        spec["target_fit"] = target.fit
    if cell.coupler == "trained":  # the training batches depend on how the Trainer draws them
        spec["data_stream"] = DATA_STREAM
        return json.loads(json.dumps(spec))
    for name in ("train_steps", "train_lr", "train_width", "train_eval_n"):
        del spec["config"][name]
    if cell.coupler != "sinkhorn":
        del spec["config"]["epsilon"], spec["config"]["sinkhorn_max_iters"]
    return json.loads(json.dumps(spec))


def run_experiment(cells: Sequence[Cell], config: ExperimentConfig, cache_dir: str | os.PathLike, *,
                   progress: bool = True, on_cell: Callable[[Cell, dict], None] | None = None) -> list[dict]:
    """Measure every cell (reading cached ones), in the given order; returns one row per cell.

    Each computed cell is written at once to ``cache_dir/<cell key>.json`` (atomically), with the
    settings that produced it; a cached cell whose settings differ is recomputed. ``on_cell(cell,
    row)`` is called after each cell (cached or not).
    """
    cache_dir = Path(cache_dir)
    targets: dict[str, Target] = {}
    rows = []
    bar = tqdm(cells, desc="batch-size cells", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.key)
        if cell.target not in targets:
            targets[cell.target] = make_target(cell.target, cache_dir=cache_dir, config=config)
        target = targets[cell.target]
        spec = _cell_spec(cell, target, config)
        path = cache_dir / f"{cell.key}.json"
        stored = json.loads(path.read_text()) if path.exists() else None
        if stored is None or stored["spec"] != spec:
            start = time.perf_counter()
            metrics = measure_cell(cell, target, config)
            stored = {"spec": spec, "metrics": metrics, "seconds": time.perf_counter() - start}
            atomic_write(path, lambda f: json.dump(stored, f, indent=1))
        row = {**asdict(cell), "dim": target.dim, "seconds": stored["seconds"], **stored["metrics"]}
        rows.append(row)
        if on_cell is not None:
            on_cell(cell, row)
    bar.close()
    return rows


# -- analysis and outputs ---------------------------------------------------------------------


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
    skip = {"target", "coupler", "batch_size", "seed", "dim", "seconds", "n_points", "n_batches", "train_steps"}
    names: list[str] = []
    for r in rows:
        if (r["coupler"] == "trained") == (kind == "trained"):
            names += [k for k in r if k not in skip and k not in names]
    return names


def _mean_std(values: Sequence[float]) -> str:
    v = torch.tensor(values, dtype=torch.float64)
    if v.numel() == 1:
        return f"{float(v[0]):.3g}"
    return f"{float(v.mean()):.3g} ± {float(v.std()):.2g}"


def _group(rows: Sequence[dict], **where) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rows:
        if all(r[k] == v for k, v in where.items()):
            out.setdefault(r["batch_size"], []).append(r)
    return dict(sorted(out.items(), key=lambda kv: kv[0] if kv[0] else math.inf))


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


# -- command line -----------------------------------------------------------------------------

_FULL = dict(targets=list(TARGETS), batch_sizes=[2 ** k for k in range(13)], sinkhorn_batch_sizes=[],
             seeds=5, n_eval=4096, train_batch_sizes=[8, 64, 256, 1024], train_seeds=2, train_steps=200,
             train_targets=list(TRAINABLE), train_eval_n=1000, moons_points=1000, fit_seconds=90.0)
_QUICK = dict(targets=["gauss2", "grid"], batch_sizes=[2 ** k for k in range(7)], sinkhorn_batch_sizes=[],
              seeds=2, n_eval=256, train_batch_sizes=[8, 64], train_seeds=1, train_steps=20,
              train_targets=["gauss2"], train_eval_n=200, moons_points=200, fit_seconds=10.0)


def build_parser(prog: str = "ot-cfm experiment batch-size") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Convergence of minibatch OT-CFM to population OT-CFM as the batch size grows.")
    p.add_argument("--quick", action="store_true", help="small settings for tests (any option below overrides them)")
    p.add_argument("--targets", nargs="+", choices=TARGETS, help=f"targets (default: all; quick: {_QUICK['targets']})")
    p.add_argument("--batch-sizes", nargs="+", type=int, help="exact-coupler batch sizes (default 2^0 .. 2^12)")
    p.add_argument("--sinkhorn-batch-sizes", nargs="*", type=int,
                   help="Sinkhorn-coupler batch sizes, e.g. 8192 16384 beyond the exact range (default: none; "
                        "one B = 1024 solve at epsilon 0.01 took 70 s on a loaded 2-core machine)")
    p.add_argument("--epsilon", type=float, default=1e-2, help="Sinkhorn epsilon, relative to the mean cost")
    p.add_argument("--seeds", type=int, help="seeds per cell (default 5)")
    p.add_argument("--n-eval", type=int, help="points per cell: ceil(n_eval / B) batches of size B (default 4096)")
    p.add_argument("--max-batches", type=int, default=256,
                   help="most batches per cell: B < n_eval / max_batches uses max_batches * B points (default 256)")
    p.add_argument("--times", nargs="+", type=float, default=[0.1, 0.5, 0.9], help="times of the regression error")
    p.add_argument("--train", action="store_true", help="also train models for the trained subset")
    p.add_argument("--train-targets", nargs="+", choices=TARGETS, help=f"default {list(TRAINABLE)}")
    p.add_argument("--train-batch-sizes", nargs="+", type=int, help="default 8 64 256 1024")
    p.add_argument("--train-seeds", type=int, help="seeds per trained cell (default 2)")
    p.add_argument("--train-steps", type=int, help="training steps per model (default 200)")
    p.add_argument("--train-eval-n", type=int, help="points for field error and W2 (default 1000)")
    p.add_argument("--moons-points", type=int, help="support size of the moons target (default 1000)")
    p.add_argument("--fit-seconds", type=float, help="time limit of each potential fit (default 90)")
    p.add_argument("--slope-min-b", type=int, default=16, help="smallest B in the slope fits (default 16)")
    p.add_argument("--out", default="runs/batch_size", help="folder of the CSV, markdown and figures")
    p.add_argument("--cache", default="runs/batch_size_cache",
                   help="folder of cached cells and fitted potentials (default runs/batch_size_cache)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _cells(args) -> list[Cell]:
    """Every cell, cheapest first (estimated cost: solves x B^2), so an interrupted run has the most cells."""
    cells = [Cell(t, "population", 0, s) for t in args.targets for s in range(args.seeds)]
    cells += [Cell(t, "exact", b, s) for b in args.batch_sizes for t in args.targets for s in range(args.seeds)]
    cells += [Cell(t, "sinkhorn", b, s) for b in args.sinkhorn_batch_sizes for t in args.targets
              for s in range(args.seeds)]
    if args.train:
        cells += [Cell(t, "trained", b, s) for b in args.train_batch_sizes for t in args.train_targets
                  if t in args.targets for s in range(args.train_seeds)]

    def cost(cell: Cell) -> float:
        if cell.coupler == "trained":
            return args.train_steps * cell.batch_size ** 2
        size = cell.batch_size or args.n_eval
        return min(args.max_batches, math.ceil(args.n_eval / size)) * size ** 2

    return sorted(cells, key=cost)


def main(argv: Sequence[str] | None = None, *, on_cell: Callable[[Cell, dict], None] | None = None,
         prog: str = "ot-cfm experiment batch-size") -> int:
    """Run the experiment from command-line arguments; print a summary; return 0."""
    args = build_parser(prog).parse_args(argv)
    preset = _QUICK if args.quick else _FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    bad = [b for b in args.batch_sizes + args.sinkhorn_batch_sizes + args.train_batch_sizes if b < 1]
    if bad or args.seeds < 1 or args.n_eval < 1:
        raise SystemExit(f"batch sizes, --seeds and --n-eval must be positive (got batch sizes {bad})")
    config = ExperimentConfig(n_eval=args.n_eval, max_batches=args.max_batches, times=tuple(args.times), epsilon=args.epsilon,
                              train_steps=args.train_steps, train_eval_n=args.train_eval_n,
                              moons_points=args.moons_points, fit_seconds=args.fit_seconds)
    out = Path(args.out)
    cache = Path(args.cache)
    start = time.perf_counter()
    rows = run_experiment(_cells(args), config, cache, progress=not args.no_progress, on_cell=on_cell)
    seconds = time.perf_counter() - start
    targets = {t: make_target(t, cache_dir=cache, config=config) for t in args.targets}
    arguments = " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"# Batch-size convergence of minibatch OT-CFM\n\nArguments: `{arguments}`. "
              f"Source N(0, I_d); min({config.n_eval}, {config.max_batches} B) points per cell, in independent "
              f"batches of size B; "
              f"Sinkhorn epsilon {config.epsilon:g} relative to the mean cost. Cell compute time (sum over cached "
              f"cells, including interrupted runs): {sum(r['seconds'] for r in rows):.0f} s; "
              f"this invocation: {seconds:.0f} s.")
    paths = write_outputs(rows, targets, out, min_batch=args.slope_min_b, header=header)
    print(f"batch-size experiment: {len(rows)} cells in {seconds:.1f} s")
    for p in paths:
        print(f"  wrote {p}")
    return 0
