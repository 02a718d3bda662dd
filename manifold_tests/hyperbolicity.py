"""Measure terminal normal hyperbolicity of any vector field v(t, x) near a manifold target.

With ``s = -log(1 - t)`` the flow reads ``dx/ds = (1 - t) v(t, x)``; its Jacobian is

    A(t, x) = (1 - t) D_x v(t, x)                                   (D x D per point)

and, for P_N, P_T the normal and tangent projectors of M at the nearest point of x,

    rho_N = tr(P_N A P_N) / codim,     rho_T = tr(P_T A P_T) / dim.

The exact OT-CFM field of a target on M has rho_N -> -1 (distance to M decays like 1 - t)
and rho_T -> 0 (neutral along M) as t -> 1 (DESIGN.md section 1). Points are either on the
exact OT path ``x_t = (1 - t) x0 + t T(x0)`` with T from ``manifold.potential()``, or on the
field's own trajectories from x0 at t = 0 (classical RK4 with a fixed step in s, where the
exact field is uniformly conditioned; in t it is stiff near t = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from manifold_tests.manifolds import ProductManifold
from manifold_tests.report import HyperbolicityReport
from ot_cfm.utils.validation import check_batch

__all__ = ["measure_hyperbolicity", "jacobian_autograd", "jacobian_finite_difference"]

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _call(field: Field, t: float, x: torch.Tensor) -> torch.Tensor:
    """``field(t, x)`` with t as a (B,) tensor, checked: same shape as x, finite."""
    out = field(torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device), x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"field(t, x) must return a tensor of the shape of x {tuple(x.shape)}, got {got}")
    if not torch.isfinite(out).all():
        raise ValueError(f"field(t, x) returned NaN or inf at t = {t:g}")
    return out


def jacobian_autograd(field: Field, t: float, x: torch.Tensor) -> torch.Tensor:
    """Per-point Jacobian ``D_x field(t, x)``: (B, D) -> (B, D, D), out[b, i, j] = d v_i / d x_j at x[b].

    Reverse mode (``torch.func.jacrev``, vmapped over the D output directions) of
    ``x -> sum_b field(t, x)[b]``: exact when the field acts on each row independently.
    """
    def summed(y: torch.Tensor) -> torch.Tensor:
        return field(torch.full((y.shape[0],), t, dtype=y.dtype, device=y.device), y).sum(0)

    with torch.enable_grad():
        jac = torch.func.jacrev(summed)(x)
    return jac.permute(1, 0, 2)


def jacobian_finite_difference(field: Field, t: float, x: torch.Tensor, step: float) -> torch.Tensor:
    """Central differences ``(v(x + step e_j) - v(x - step e_j)) / (2 step)``: (B, D) -> (B, D, D)."""
    b, d = x.shape
    shift = step * torch.eye(d, dtype=x.dtype, device=x.device)
    points = torch.cat([(x[:, None, :] + shift).reshape(-1, d), (x[:, None, :] - shift).reshape(-1, d)])
    values = _call(field, t, points).reshape(2, b, d, d)
    return ((values[0] - values[1]) / (2 * step)).transpose(1, 2)


def _times(times) -> torch.Tensor:
    times = torch.as_tensor(times, dtype=torch.float64).reshape(-1) if not isinstance(times, torch.Tensor) \
        else times.detach().to(torch.float64).reshape(-1)
    if times.numel() == 0:
        raise ValueError("times is empty; expected times in (0, 1)")
    if not torch.isfinite(times).all() or (times <= 0).any() or (times >= 1).any():
        raise ValueError(f"times must lie in the open interval (0, 1), got {times.tolist()}")
    if (times[1:] <= times[:-1]).any():
        raise ValueError(f"times must be strictly increasing, got {times.tolist()}")
    return times


def _integrate(field: Field, x0: torch.Tensor, times: torch.Tensor, ds: float) -> list[torch.Tensor]:
    """States of ``dx/ds = (1 - t) v(t, x)``, t = 1 - e^{-s}, from s = 0 at the given times (RK4, step <= ds)."""
    def rhs(s: float, x: torch.Tensor) -> torch.Tensor:
        t = -math.expm1(-s)
        return math.exp(-s) * _call(field, t, x)

    states, x, s = [], x0, 0.0
    for target in (-torch.log1p(-times)).tolist():
        steps = max(1, math.ceil((target - s) / ds))
        h = (target - s) / steps
        for _ in range(steps):
            k1 = rhs(s, x)
            k2 = rhs(s + h / 2, x + h / 2 * k1)
            k3 = rhs(s + h / 2, x + h / 2 * k2)
            k4 = rhs(s + h, x + h * k3)
            x, s = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + h
        s = target
        states.append(x)
    return states


def _restricted_spectrum(a: torch.Tensor, projector: torch.Tensor, rank: int) -> torch.Tensor:
    """Ascending eigenvalues of the symmetric part of ``U^T A U`` (U: (B, D, rank) orthonormal basis of the
    projector's range): (B, rank)."""
    if rank == 0:
        return a.new_zeros(a.shape[0], 0)
    basis = torch.linalg.eigh(projector).eigenvectors[:, :, -rank:]
    compressed = basis.transpose(1, 2) @ a @ basis
    return torch.linalg.eigvalsh((compressed + compressed.transpose(1, 2)) / 2)


def measure_hyperbolicity(field: Field, manifold: ProductManifold, times: Sequence[float] | torch.Tensor,
                          n: int = 256, *, generator: torch.Generator | None = None,
                          jacobian: str = "autograd", h: float = 1e-3, chunk_size: int = 128,
                          along: str = "path", ds: float = 0.05, dtype: torch.dtype = torch.float64,
                          device: torch.device | str | None = None,
                          progress: bool | None = None) -> HyperbolicityReport:
    """Normal and tangential rates of ``field`` near ``manifold`` at each of ``times``.

    Args:
        field: callable ``field(t, x)``, t a (B,) tensor, x (B, D) -> (B, D), acting row by row
            (an ``nn.Module`` is used as given: put it in eval mode and the wanted dtype).
        manifold: the target's support; D = ``manifold.ambient_dim``.
        times: strictly increasing times in the open interval (0, 1).
        n: points per time, from x0 ~ N(0, I_D) drawn once with ``generator``.
        jacobian: "autograd" (exact, ``torch.func.jacrev``) or "finite_difference" (central differences
            with step ``h (1 - t)``, the normal length scale of the path at time t: for non-differentiable
            fields such as a discrete potential's, it is the scale at which the field is resolved;
            autograd sees only their locally constant target and returns A = -I).
        h: relative finite-difference step (ignored by "autograd").
        chunk_size: points per Jacobian evaluation (memory about ``chunk_size D^2`` numbers).
        along: "path" (x_t on the exact OT path of the manifold's potential) or "field" (the field's
            own trajectories from x0, RK4 in s with step at most ``ds``). Along the path the distances
            to M, hence ``distance_ratio`` and ``normal_exponent``, depend on the path only; they
            test the field along="field".
        dtype, device: of the points (default float64 on the generator's device, or CPU).
        progress: tqdm bar over times; None shows it only on a terminal.

    Returns:
        HyperbolicityReport with one entry per time (see its docstring).
    """
    if not isinstance(manifold, ProductManifold):
        raise ValueError(f"manifold must be a manifold_tests ProductManifold, got {type(manifold).__name__}")
    if not callable(field):
        raise ValueError(f"field must be callable as field(t, x), got {type(field).__name__}")
    if jacobian not in ("autograd", "finite_difference"):
        raise ValueError(f"jacobian must be 'autograd' or 'finite_difference', got {jacobian!r}")
    if along not in ("path", "field"):
        raise ValueError(f"along must be 'path' or 'field', got {along!r}")
    if int(n) != n or n < 1 or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"n and chunk_size must be positive integers, got {n!r}, {chunk_size!r}")
    if not (h > 0 and ds > 0):
        raise ValueError(f"h and ds must be positive, got h={h!r}, ds={ds!r}")
    times = _times(times)
    d = manifold.ambient_dim
    field_dim = getattr(field, "dim", getattr(getattr(field, "potential", None), "dim", None))
    if isinstance(field_dim, int) and field_dim != d:
        raise ValueError(f"field works in dimension {field_dim} but the manifold's ambient dimension is {d}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    x0 = torch.randn(int(n), d, generator=generator, dtype=dtype, device=device)
    try:
        _call(field, float(times[0]), x0[:1])
    except (RuntimeError, TypeError, IndexError) as err:
        raise ValueError(f"field(t, x) failed on x of shape (1, {d}) (the manifold's ambient dimension is {d}): "
                         f"{err}") from err

    if along == "path":
        x1 = manifold.potential(dtype=dtype, device=device).transport_map(x0)
        states = [(1 - t) * x0 + t * x1 for t in times.tolist()]
    else:
        states = _integrate(field, x0, times, ds)

    eye = torch.eye(d, dtype=dtype, device=device)
    rows = {key: [] for key in ("rho_N", "rho_N_std", "rho_T", "rho_T_std", "normal", "tangent",
                                "distance", "ratio", "ratio_std")}
    disable = None if progress is None else not progress
    for t, x in tqdm(list(zip(times.tolist(), states)), desc="hyperbolicity", disable=disable, leave=False):
        check_batch(x, "x_t")
        jac = []
        for start in range(0, x.shape[0], chunk_size):
            chunk = x[start:start + chunk_size].detach()
            if jacobian == "autograd":
                jac.append(jacobian_autograd(field, t, chunk))
            else:
                jac.append(jacobian_finite_difference(field, t, chunk, h * (1 - t)))
        a = (1 - t) * torch.cat(jac).detach()
        if not torch.isfinite(a).all():
            raise ValueError(f"the Jacobian of field(t, x) is not finite at t = {t:g}")
        p_t = manifold.tangent_projector(x)
        p_n = eye - p_t
        for name, projector, rank in (("N", p_n, manifold.codim), ("T", p_t, manifold.dim)):
            rate = (a * projector).sum((1, 2)) / rank if rank else a.new_full((x.shape[0],), float("nan"))
            rows[f"rho_{name}"].append(rate.mean())
            rows[f"rho_{name}_std"].append(rate.std() if rate.numel() > 1 else torch.zeros_like(rate[0]))
        rows["normal"].append(_restricted_spectrum(a, p_n, manifold.codim).mean(0))
        rows["tangent"].append(_restricted_spectrum(a, p_t, manifold.dim).mean(0))
        dist = manifold.distance(x)
        rows["distance"].append(dist.mean())
        rows["ratio"].append((dist / (1 - t)).mean())
        rows["ratio_std"].append((dist / (1 - t)).std() if dist.numel() > 1 else torch.zeros_like(dist[0]))

    s = -torch.log1p(-times).to(dtype=dtype, device=device)
    distance = torch.stack(rows["distance"])
    exponent = float("nan")
    if len(times) > 1 and bool((distance > 0).all()):
        y, sc = distance.log(), s - s.mean()
        exponent = float((sc * (y - y.mean())).sum() / sc.square().sum())
    return HyperbolicityReport(
        times=times.to(dtype=dtype, device=device), s=s,
        rho_N=torch.stack(rows["rho_N"]), rho_N_std=torch.stack(rows["rho_N_std"]),
        rho_T=torch.stack(rows["rho_T"]), rho_T_std=torch.stack(rows["rho_T_std"]),
        normal_spectrum=torch.stack(rows["normal"]), tangent_spectrum=torch.stack(rows["tangent"]),
        distance=distance, distance_ratio=torch.stack(rows["ratio"]), distance_ratio_std=torch.stack(rows["ratio_std"]),
        normal_exponent=exponent, manifold=f"{manifold.name} in R^{d}", dim=manifold.dim, codim=manifold.codim, n=int(n), along=along,
        jacobian=jacobian)
