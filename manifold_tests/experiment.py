"""Terminal normal hyperbolicity of OT-CFM fields near manifold targets.

Three measurements with ``manifold_tests.measure_hyperbolicity`` (rates of
``A = (1 - t) D_x v`` on the exact OT path; DESIGN.md section 1):

(a) the exact field of the sphere S^2, the cylinder S^1 x R and the Clifford torus: rho_N = -1,
    rho_T -> 0 like (1 - t);
(b) an MLP trained by OT-CFM (exact minibatch coupler) on samples of the sphere and the torus;
(c) the exact field of an empirical target, N samples of S^2: the measure sum_j w_j delta_{y_j}
    with w_j the mass of the Voronoi cone of y_j (dual weights g = 0, so the potential
    max_j <x, y_j> is exact without fitting; w_j ~ 1/N). Its Jacobian, resolved by finite
    differences at the path's scale 1 - t along its own trajectories, is neutral tangentially
    only while 1 - t exceeds the spacing of the samples: the break time t* (rho_T = -1/2)
    moves to 1 like 1 - t* ~ N^{-1/2}.

Writes ``manifold_hyperbolicity.md`` (or ``manifold_<name>.md``) and PNG figures to ``--out``.
Usage: ``ot-cfm manifold [--quick] [--manifold NAME] [--out DIR]`` or
``python examples/manifold_hyperbolicity.py`` (same options).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from manifold_tests.hyperbolicity import measure_hyperbolicity
from manifold_tests.manifolds import MANIFOLD_NAMES, ProductManifold, manifold_by_name
from manifold_tests.report import HyperbolicityReport
from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.evaluation.plotting import save_figure
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import TrainConfig, Trainer
from ot_cfm.utils.atomic import atomic_write
from ot_cfm.utils.parallelism import torch_threads
from proximal.discrete import DiscreteBrenierPotential
from proximal.field import ExactVelocityField

__all__ = ["run", "main", "break_time", "summary_markdown"]

TABLE_TIMES = (0.9, 0.99, 0.999)
FULL = dict(n=512, times=(0.5, 0.7, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999), steps=5000, batch=256,
            sizes=(100, 1000, 10000), empirical_n=256, empirical_s=torch.linspace(0.5, 7.0, 14).tolist())
QUICK = dict(n=64, times=(0.5, 0.9, 0.99, 0.999), steps=200, batch=128,
             sizes=(100, 1000), empirical_n=64, empirical_s=torch.linspace(1.0, 4.0, 6).tolist())


def exact_report(manifold: ProductManifold, cfg: dict, seed: int) -> HyperbolicityReport:
    """(a) rates of the exact field of ``manifold`` (autograd Jacobian, float64)."""
    return measure_hyperbolicity(ExactVelocityField(manifold.potential()), manifold, cfg["times"], n=cfg["n"],
                                 generator=torch.Generator().manual_seed(seed))


def learned_report(manifold: ProductManifold, cfg: dict, seed: int) -> tuple[HyperbolicityReport, float]:
    """(b) train an MLP by OT-CFM on samples of ``manifold``; its rates and the final training loss."""
    torch.manual_seed(seed)  # model initialisation
    model = MLP(manifold.ambient_dim, width=128, depth=3, time_embedding="sinusoidal")
    trainer = Trainer(model, ConditionalFlowMatcher(coupler=ExactOTCoupler()),
                      lambda n, g: torch.randn(n, manifold.ambient_dim, generator=g),
                      lambda n, g: manifold.sample(n, g),
                      TrainConfig(steps=cfg["steps"], batch_size=cfg["batch"], lr=1e-3, schedule="cosine",
                                  seed=seed, progress=False, threads=torch.get_num_threads()))
    result = trainer.fit()
    field = model.eval().double()
    report = measure_hyperbolicity(field, manifold, cfg["times"], n=cfg["n"],
                                   generator=torch.Generator().manual_seed(seed))
    return report, result.loss


def empirical_report(manifold: ProductManifold, size: int, cfg: dict, seed: int) -> HyperbolicityReport:
    """(c) the exact field of ``size`` samples of ``manifold`` weighted by their Voronoi-cone masses."""
    g = torch.Generator().manual_seed(seed)
    support = manifold.sample(size, g, dtype=torch.float64)
    cells = DiscreteBrenierPotential(support, None, torch.zeros(size, dtype=torch.float64))
    counts = torch.bincount(cells.assign(torch.randn(2 ** 16, manifold.ambient_dim, generator=g,
                                                     dtype=torch.float64)), minlength=size)
    potential = DiscreteBrenierPotential(support, counts.double() / counts.sum(), cells.dual_weights)
    times = [-math.expm1(-s) for s in cfg["empirical_s"]]
    return measure_hyperbolicity(ExactVelocityField(potential), manifold, times, n=cfg["empirical_n"], generator=g,
                                 jacobian="finite_difference", h=1.0, along="field", ds=0.1)


def break_time(report: HyperbolicityReport, level: float = -0.5) -> float:
    """First t where rho_T falls to ``level`` (linear in s between measured times); NaN if it never does."""
    rho, s = report.rho_T.tolist(), report.s.tolist()
    for i in range(1, len(rho)):
        if rho[i] <= level < rho[i - 1]:
            crossing = s[i - 1] + (level - rho[i - 1]) / (rho[i] - rho[i - 1]) * (s[i] - s[i - 1])
            return -math.expm1(-crossing)
    return float("nan")


def _at(report: HyperbolicityReport, rate: torch.Tensor, t: float) -> str:
    i = int((report.times - t).abs().argmin())
    return f"{float(rate[i]):.4g}" if abs(float(report.times[i]) - t) < 1e-9 else "-"


def summary_markdown(reports: dict[str, HyperbolicityReport], losses: dict[str, float], command: str) -> str:
    """Tables of rho_N, rho_T at TABLE_TIMES (exact and learned), break times (empirical), then every report."""
    lines = ["# Terminal normal hyperbolicity near manifold targets", "", f"Command: `{command}`", "",
             "A = (1 - t) D_x v on the exact OT path; rho_N = tr(P_N A P_N)/codim (exact -1), "
             "rho_T = tr(P_T A P_T)/dim (exact -> 0 like 1 - t).", "",
             "| manifold | field | " + " | ".join(f"rho_N t={t}" for t in TABLE_TIMES) + " | "
             + " | ".join(f"rho_T t={t}" for t in TABLE_TIMES) + " |",
             "| --- | --- |" + " --- |" * (2 * len(TABLE_TIMES))]
    for key, rep in reports.items():
        kind, name = key.split("/")
        if kind in ("exact", "learned"):
            label = kind if kind == "exact" else f"learned (MLP, final loss {losses[key]:.3g})"
            lines.append(f"| {name} | {label} | " + " | ".join(_at(rep, rep.rho_N, t) for t in TABLE_TIMES) + " | "
                         + " | ".join(_at(rep, rep.rho_T, t) for t in TABLE_TIMES) + " |")
    empirical = {k: r for k, r in reports.items() if k.startswith("empirical")}
    if empirical:
        lines += ["", "Empirical targets (N samples, Voronoi-cone weights), finite differences at scale 1 - t, "
                  "along the field's trajectories: t* where rho_T first reaches -1/2.", "",
                  "| target | N | t* | 1 - t* | (1 - t*) sqrt(N) |", "| --- | --- | --- | --- | --- |"]
        for key, rep in empirical.items():
            size, t_star = int(key.split("/")[0].split("-")[1]), break_time(rep)
            lines.append(f"| {key.split('/')[1]} | {size} | {t_star:.4g} | {1 - t_star:.3g} "
                         f"| {(1 - t_star) * math.sqrt(size):.3g} |")
    lines += ["", "## Reports", ""]
    for key, rep in reports.items():
        lines += [f"### {key}", "", rep.to_markdown(), ""]
    return "\n".join(lines)


def plot_rates(reports: dict[str, HyperbolicityReport], path: Path) -> None:
    """rho_N and rho_T against s: exact solid, learned dashed, one colour per manifold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {}  # one colour, marker and (decreasing) size per manifold: exact curves that coincide at -1 stay visible
    for key, rep in reports.items():
        kind, name = key.split("/")
        if kind not in ("exact", "learned"):
            continue
        k = len(styles)
        colour, marker, size = styles.setdefault(name, (f"C{k}", "o^sDv"[k % 5], max(10 - 3 * k, 3)))
        for ax, rate in zip(axes, (rep.rho_N, rep.rho_T)):
            if kind == "exact":
                ax.plot(rep.s, rate, "-", marker=marker, color=colour, mfc="none", markersize=size, lw=1,
                        label=f"{name}, exact")
            else:
                ax.plot(rep.s, rate, "--", marker=marker, color=colour, markersize=4, label=f"{name}, learned")
    for ax, label, ref in zip(axes, (r"$\rho_N$ (normal rate; exact value $-1$)", r"$\rho_T$ (tangential rate; exact $\to 0$)"),
                              (-1.0, 0.0)):
        ax.axhline(ref, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(r"$s = -\log(1-t)$")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title("normal: exact curves coincide at $-1$ (hollow markers)", fontsize=9)
    axes[1].set_title("tangential", fontsize=9)
    save_figure(fig, path, title="Exact (solid) and learned (dashed) OT-CFM fields near manifold targets", dpi=120)


def plot_empirical(reports: dict[str, HyperbolicityReport], path: Path) -> None:
    """rho_T against s for empirical targets of growing N, with the continuum (exact) curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (key, rep) in enumerate(k for k in reports.items() if k[0].startswith("empirical")):
        ax.plot(rep.s, rep.rho_T, "-o", color=f"C{i}", markersize=4, label=f"N = {key.split('/')[0].split('-')[1]}")
        t_star = break_time(rep)
        if not math.isnan(t_star):
            ax.axvline(-math.log1p(-t_star), color=f"C{i}", linestyle=":", linewidth=1)
    for key, rep in reports.items():
        if key.startswith("exact/") and any(k.endswith(key[5:]) for k in reports if k.startswith("empirical")):
            ax.plot(rep.s, rep.rho_T, "k-", label="continuum (exact)")
    ax.axhline(-0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(r"$s = -\log(1-t)$")
    ax.set_ylabel(r"$\rho_T$ (finite differences at scale $1-t$)")
    ax.set_title("Tangential neutrality breaks when the samples are resolved")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def run(manifold: str | None = None, *, quick: bool = False, out_dir: str | Path | None = "examples/results",
        seed: int = 0, command: str = "") -> dict[str, HyperbolicityReport]:
    """Measure (a) exact, (b) learned and (c) empirical fields; write the markdown and figures to ``out_dir``.

    ``manifold`` None runs the full example (exact: sphere, cylinder, torus; learned: sphere, torus;
    empirical: sphere); a name from ``MANIFOLD_NAMES`` runs (a), (b), (c) on that manifold only.
    Returns the reports keyed "exact/<name>", "learned/<name>", "empirical-<N>/<name>".
    """
    cfg = QUICK if quick else FULL
    exact_names = ("sphere", "cylinder", "torus") if manifold is None else (manifold,)
    learned_names = ("sphere", "torus") if manifold is None else (manifold,)
    empirical_name = "sphere" if manifold is None else manifold
    reports, losses = {}, {}
    for name in exact_names:
        reports[f"exact/{name}"] = exact_report(manifold_by_name(name), cfg, seed)
    for name in learned_names:
        reports[f"learned/{name}"], losses[f"learned/{name}"] = learned_report(manifold_by_name(name), cfg, seed)
    if f"exact/{empirical_name}" not in reports:
        reports[f"exact/{empirical_name}"] = exact_report(manifold_by_name(empirical_name), cfg, seed)
    for size in cfg["sizes"]:
        reports[f"empirical-{size}/{empirical_name}"] = empirical_report(manifold_by_name(empirical_name), size,
                                                                         cfg, seed)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tag = "hyperbolicity" if manifold is None else manifold
        summary = summary_markdown(reports, losses, command) + "\n"
        atomic_write(out / f"manifold_{tag}.md", lambda f: f.write(summary))
        plot_rates(reports, out / f"manifold_{tag}_rates.png")
        plot_empirical(reports, out / f"manifold_{tag}_empirical.png")
    return reports


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Command line: ``--manifold NAME``, ``--quick``, ``--out DIR``, ``--seed``, ``--threads``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--manifold", choices=MANIFOLD_NAMES, default=None,
                        help="one manifold only (default: the full example on sphere, cylinder, torus)")
    parser.add_argument("--quick", action="store_true", help="few points, times and training steps (tests)")
    parser.add_argument("--out", default="runs/manifold", help="output folder of the markdown and figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (small batched kernels are fastest on one)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    command = " ".join(["ot-cfm manifold", *argv])
    start = time.perf_counter()
    with torch_threads(args.threads):  # restored after: `ot-cfm manifold` runs in the caller's process
        reports = run(args.manifold, quick=args.quick, out_dir=args.out, seed=args.seed, command=command)
    for key, rep in reports.items():
        print(f"{key}: {rep.verdict(tangent_tol=0.05)}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
