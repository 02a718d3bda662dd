"""The result of a hyperbolicity measurement: rates per time, a table, a figure and a verdict.

Near t = 1 the rescaled flow ``dx/ds = (1 - t) v(t, x)``, ``s = -log(1 - t)``, of the exact
OT-CFM field of a target supported on a manifold M has Jacobian ``A = (1 - t) D_x v`` with
normal rate ``rho_N -> -1`` and tangential rate ``rho_T -> 0`` (DESIGN.md section 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ot_cfm.evaluation.plotting import save_figure

__all__ = ["HyperbolicityReport"]


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"


@dataclass(frozen=True)
class HyperbolicityReport:
    """Measured rates at T times, each a mean over n points (spreads: standard deviations over points).

    Attributes:
        times: (T,) measured times t in (0, 1).  s: (T,) ``-log(1 - t)``.
        rho_N, rho_N_std: (T,) ``tr(P_N A P_N) / codim`` (NaN if codim = 0).
        rho_T, rho_T_std: (T,) ``tr(P_T A P_T) / dim`` (NaN if dim = 0).
        normal_spectrum: (T, codim) eigenvalues, ascending, of the symmetric part of the compression
            ``U_N^T A U_N`` (U_N an orthonormal basis of the normal space), averaged over points.
        tangent_spectrum: (T, dim) the same for the tangent space.
        distance: (T,) mean of ``dist(x_t, M)``.
        distance_ratio, distance_ratio_std: (T,) ``dist(x_t, M) / (1 - t)``.
        normal_exponent: least-squares slope of ``log distance`` against s (exact value -1; NaN
            with fewer than two times or zero distances).
        manifold: description of the manifold.  dim, codim: its dimension and codimension.
        n: points per time.  along: "path" or "field".  jacobian: "autograd" or "finite_difference".
    """

    times: torch.Tensor
    s: torch.Tensor
    rho_N: torch.Tensor
    rho_N_std: torch.Tensor
    rho_T: torch.Tensor
    rho_T_std: torch.Tensor
    normal_spectrum: torch.Tensor
    tangent_spectrum: torch.Tensor
    distance: torch.Tensor
    distance_ratio: torch.Tensor
    distance_ratio_std: torch.Tensor
    normal_exponent: float
    manifold: str
    dim: int
    codim: int
    n: int
    along: str
    jacobian: str

    def _index(self, at: float | None) -> int:
        """Index of the measured time nearest to ``at`` (the last time if None)."""
        if at is None:
            return len(self.times) - 1
        return int((self.times - at).abs().argmin())

    def is_normally_hyperbolic(self, *, normal_tol: float = 0.05, tangent_tol: float = 0.05,
                               at: float | None = None) -> bool:
        """Whether, at the measured time nearest ``at`` (default: the last), ``|rho_N + 1| <= normal_tol``
        and ``|rho_T| <= tangent_tol`` (a rate that is undefined because dim or codim is 0 passes)."""
        return self.verdict(normal_tol=normal_tol, tangent_tol=tangent_tol, at=at).startswith("normally hyperbolic")

    def verdict(self, *, normal_tol: float = 0.05, tangent_tol: float = 0.05, at: float | None = None) -> str:
        """One sentence: "normally hyperbolic ..." or "not normally hyperbolic: <reasons>"."""
        i = self._index(at)
        t, rn, rt = float(self.times[i]), float(self.rho_N[i]), float(self.rho_T[i])
        problems = []
        if not math.isnan(rn) and abs(rn + 1) > normal_tol:
            kind = "too weak" if rn > -1 else "too strong"
            problems.append(f"normal rate rho_N = {rn:.4g} is {kind} (expected -1 within {normal_tol})")
        if not math.isnan(rt) and abs(rt) > tangent_tol:
            kind = "contracts" if rt < 0 else "expands"
            problems.append(f"tangential rate rho_T = {rt:.4g} {kind} (expected 0 within {tangent_tol})")
        if problems:
            return f"not normally hyperbolic at t = {t:g}: " + "; ".join(problems)
        return f"normally hyperbolic at t = {t:g}: rho_N = {rn:.4g}, rho_T = {rt:.4g}"

    def to_markdown(self) -> str:
        """A markdown table, one row per time: t, s, rho_N, rho_T (mean +- std), spectra ranges, dist / (1-t)."""
        lines = [f"{self.manifold} (dim {self.dim}, codim {self.codim}), n = {self.n}, along the {self.along}, "
                 f"{self.jacobian} Jacobian; normal distance exponent {_fmt(self.normal_exponent)} (exact -1)",
                 "",
                 "| t | s | rho_N | rho_T | normal eigenvalues | tangent eigenvalues | dist/(1-t) |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for i in range(len(self.times)):
            def span(spectrum):
                if spectrum.shape[1] == 0:
                    return "-"
                return f"[{_fmt(float(spectrum[i, 0]))}, {_fmt(float(spectrum[i, -1]))}]"

            lines.append(
                f"| {float(self.times[i]):g} | {float(self.s[i]):.3g} "
                f"| {_fmt(float(self.rho_N[i]))} ± {_fmt(float(self.rho_N_std[i]))} "
                f"| {_fmt(float(self.rho_T[i]))} ± {_fmt(float(self.rho_T_std[i]))} "
                f"| {span(self.normal_spectrum)} | {span(self.tangent_spectrum)} "
                f"| {_fmt(float(self.distance_ratio[i]))} ± {_fmt(float(self.distance_ratio_std[i]))} |")
        return "\n".join(lines)

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Draw rho_N and rho_T (mean +- std) against s, and dist / (1-t); save to ``path`` (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s = self.s.cpu().double()
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
        for rate, std, label, ref in ((self.rho_N, self.rho_N_std, r"$\rho_N$", -1.0),
                                      (self.rho_T, self.rho_T_std, r"$\rho_T$", 0.0)):
            rate, std = rate.cpu().double(), std.cpu().double()
            line, = ax.plot(s, rate, marker="o", label=label)
            ax.fill_between(s, rate - std, rate + std, color=line.get_color(), alpha=0.2)
            ax.axhline(ref, color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_xlabel(r"$s = -\log(1-t)$")
        ax.set_ylabel("rate")
        ax.legend()
        ratio, std = self.distance_ratio.cpu().double(), self.distance_ratio_std.cpu().double()
        bx.plot(s, ratio, marker="o")
        bx.fill_between(s, ratio - std, ratio + std, alpha=0.2)
        bx.set_xlabel(r"$s = -\log(1-t)$")
        bx.set_ylabel(r"dist$(x_t, M)/(1-t)$")
        default = f"{self.manifold}: along the {self.along}, {self.jacobian} Jacobian"
        return save_figure(fig, path, title=title or default, dpi=120)
