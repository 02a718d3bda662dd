"""The (extended) Brenier potential and the exact OT-CFM field it defines.

A convex ``phi`` on R^d whose gradient ``T = grad phi`` pushes the source onto the target.
For 0 < t < 1 and ``lam = (1 - t) / t`` the point of the target reached through ``x``
at time t is (proximal form of the OT-CFM field, DESIGN.md section 1)

    x1(x, t) = prox_{lam phi^*}(x / t),    x1(x, 0) = grad phi(x),
    u_t(x)   = (x1(x, t) - x) / (1 - t).

Subclasses implement ``transport_map`` and ``prox_conjugate``; everything else follows.

Near t = 1 the field is written with the time to go ``s = 1 - t``: ``u = (x1 - x) / s``, in
float64 whatever the input's dtype (see ``velocity`` for the accuracy per dtype). A float32 ``t``
cannot hold ``s`` below 6e-8 (1 - 1e-9 rounds to 1.0), so times are read in float64 (pass t as a
Python float or a float64 tensor) and ``velocity_at_time_to_go`` takes s itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ot_cfm.utils.validation import as_time_tensor, check_batch

__all__ = ["BrenierPotential"]

F64 = torch.float64


def _times64(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a (B,) float64 tensor on x's device, converted exactly (not rounded to x's dtype)."""
    return as_time_tensor(t, torch.empty(x.shape[0], 0, dtype=F64, device=x.device))


def time_to_go(t: float | torch.Tensor, x: torch.Tensor, *, allow_one: bool = False) -> torch.Tensor:
    """``s = 1 - t`` as a (B,) float64 tensor for times t in [0, 1) ([0, 1] with ``allow_one``).

    ``1 - t`` is exact in float64 for t >= 1/2 (Sterbenz), so s keeps every bit the given t holds.
    """
    t = _times64(t, x)
    if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any() or (not allow_one and (t == 1).any()):
        bad = t[~(torch.isfinite(t) & (t >= 0) & ((t <= 1) if allow_one else (t < 1)))].unique()[:5].tolist()
        interval = "[0, 1]" if allow_one else "[0, 1)"
        hint = "" if allow_one or not (t == 1).any() else (
            ": the field (x1 - x) / (1 - t) is undefined at t = 1 (every source point of a cell arrives "
            "at the same target point, with its own velocity). ODE solvers that evaluate the end time "
            "(dopri5, tsit5, rk4) cannot integrate it to t = 1: use euler or midpoint, exact on its straight "
            "paths. A float32 t cannot hold 1 - t below 6e-8 (1 - 1e-9 rounds to 1.0): pass t as a Python "
            "float or a float64 tensor, or give the time to go s = 1 - t (ExactVelocityField.at_time_to_go, "
            "BrenierPotential.velocity_at_time_to_go)")
        raise ValueError(f"t must lie in {interval}, got values {bad}{hint}")
    return 1 - t


def check_time_to_go(s: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The time to go ``s = 1 - t`` as a (B,) float64 tensor, checked to lie in (0, 1]."""
    s = _times64(s, x)
    if not (torch.isfinite(s).all() and (s > 0).all() and (s <= 1).all()):
        bad = s[~(torch.isfinite(s) & (s > 0) & (s <= 1))].unique()[:5].tolist()
        raise ValueError(f"the time to go s = 1 - t must lie in (0, 1], got values {bad} (s = 0 is t = 1, "
                         "where the field is undefined)")
    return s


class BrenierPotential(ABC):
    """Base class: a convex potential on R^dim, evaluated batchwise on (B, dim) tensors.

    Parameters are stored once as tensors and cast lazily (and cached) to the device
    and dtype of each input, so one potential serves CPU and GPU, float32 and float64.
    """

    def __init__(self, dim: int) -> None:
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self._tensors: dict[str, torch.Tensor] = {}
        self._cache: dict[tuple, torch.Tensor] = {}

    # -- parameters ---------------------------------------------------------------------

    def _register(self, name: str, value: torch.Tensor) -> None:
        """Store a parameter tensor (detached); casts of it are made on demand."""
        self._tensors[name] = value.detach()
        self._cache = {k: v for k, v in self._cache.items() if k[0] != name}

    def _param(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The parameter ``name`` on ``like``'s device and dtype (cached)."""
        key = (name, like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self._tensors[name].to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    # -- checks -------------------------------------------------------------------------

    def _check_points(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        """Check a (B, dim) batch of finite floating points."""
        check_batch(x, name)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (B, {self.dim}), got {tuple(x.shape)}")
        return x

    def _check_lam(self, lam: float | torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Prox parameters as a (B,) tensor of finite positive values on z's device and dtype."""
        lam = torch.as_tensor(lam, dtype=z.dtype, device=z.device)
        if lam.ndim == 0:
            lam = lam.expand(z.shape[0])
        if lam.shape != (z.shape[0],):
            raise ValueError(f"lam must be a float or a tensor of shape ({z.shape[0]},), got {tuple(lam.shape)}")
        if not (torch.isfinite(lam).all() and (lam > 0).all()):
            raise ValueError(f"lam must be finite and positive, got values {lam[:5].tolist()}")
        return lam

    # -- the two primitives -------------------------------------------------------------

    @abstractmethod
    def transport_map(self, x0: torch.Tensor) -> torch.Tensor:
        """Brenier map ``T(x0) = grad phi(x0)``: (B, dim) -> (B, dim)."""

    @abstractmethod
    def prox_conjugate(self, z: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """``prox_{lam phi^*}(z) = argmin_y lam phi^*(y) + |y - z|^2 / 2``: (B, dim) -> (B, dim).

        ``lam`` is a positive float or a (B,) tensor (one parameter per row).
        """

    # -- derived quantities -------------------------------------------------------------

    def recover_target(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Target point ``x1(x, t)``: ``prox_{lam phi^*}(x / t)`` with ``lam = (1-t)/t``, ``T(x)`` at t = 0.

        x: (B, dim); t: float or (B,) in [0, 1) (rows may mix t = 0 and t > 0), read in float64.
        Returns (B, dim) in x's dtype.
        """
        self._check_points(x)
        return self._recover_target(x, time_to_go(t, x))

    def _recover_target(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``x1`` for float64 times to go ``s`` (B,) in (0, 1]; computed in x's dtype."""
        t = 1 - s
        positive = t > 0
        if bool(positive.all()):
            return self.prox_conjugate(x / t.to(x.dtype)[:, None], (s / t).to(x.dtype))
        if not bool(positive.any()):
            return self.transport_map(x)
        out = torch.empty_like(x)
        tp, sp = t[positive], s[positive]
        out[positive] = self.prox_conjugate(x[positive] / tp.to(x.dtype)[:, None], (sp / tp).to(x.dtype))
        out[~positive] = self.transport_map(x[~positive])
        return out

    def velocity(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Exact OT-CFM field ``u_t(x) = (x1(x, t) - x) / (1 - t)``: x (B, dim), t float or (B,) in [0, 1).

        ``t`` is read in float64 (a Python float, or a tensor of any floating dtype, converted
        exactly); ``s = 1 - t`` is then exact for t >= 1/2. The field is computed in float64 and
        returned in x's dtype. Accuracy, for the x and t given (the field at these very numbers):

        - empirical targets (``DiscreteBrenierPotential``) and point masses: the target point y is
          exact, so ``(y - x) / s`` carries at most three float64 roundings (s, the difference, the
          quotient), then one rounding to x's dtype: relative error per component <= 2^-51 in
          float64, <= 2^-24 + 2^-51 in float32, for every t < 1 (given the right y: see
          ``DiscreteBrenierPotential.assign`` for ties in float32);
        - Gaussian, sphere, tensor grid (and products of them): cancellation-free closed forms
          (see each class) in float64, a few roundings relative to the terms they combine; where
          the field is ``O(1 / s)`` sensitive to x (normal to a sphere, the null space of a singular
          covariance) add an absolute error of a few ``2^-53 |x| / s``, the error that rounding x
          itself to float64 would already make.

        ``tests/proximal/test_field.py`` checks these bounds against rational arithmetic at
        t = 1 - 1e-7 and 1 - 1e-9, and at s = 1e-9 to 1e-20.

        What no dtype can give back is an x rounded before the call: near t = 1 the field moves by
        ``|dx| / s`` when x moves by dx, so a state stored in float32 (|dx| ~ 6e-8 |x|) fixes the
        field only to about ``6e-8 |x| / s``. t = 1 raises: the field is undefined there (use
        ``velocity_at_time_to_go`` for times closer to 1 than the dtype of t can hold). A field that
        overflows x's dtype (|u| above its largest value, e.g. float16 off the path at tiny s)
        raises instead of returning inf.
        """
        self._check_points(x)
        s = time_to_go(t, x)
        return self._finish(self._velocity64(x, s), x, s)

    def velocity_at_time_to_go(self, x: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
        """``u_t(x)`` at ``t = 1 - s`` for a time to go s (float or (B,)) in (0, 1]; as ``velocity``,
        for times closer to 1 than a float32 (or even float64) t can represent."""
        self._check_points(x)
        s = check_time_to_go(s, x)
        return self._finish(self._velocity64(x, s), x, s)

    def _velocity64(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The field in float64 for x (B, dim) in any dtype and float64 s (B,) in (0, 1].

        Generic form: ``(x1 - x) / s`` with ``x1`` from ``prox_conjugate`` in float64; its
        accuracy is that of the prox. Subclasses override it with exact or cancellation-free forms.
        """
        x = x.to(F64)
        return (self._recover_target(x, s) - x) / s[:, None]

    @staticmethod
    def _finish(u: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Round the float64 field to x's dtype; raise if it does not fit."""
        out = u.to(x.dtype)
        if not torch.isfinite(out).all():
            rows = (~torch.isfinite(out)).any(1)
            raise ValueError(f"the field does not fit in {x.dtype} at 1 - t = {float(s[rows].min()):.3g} "
                             f"(|u| = |x1 - x| / (1 - t) above {torch.finfo(x.dtype).max:.3g} in rows "
                             f"{rows.nonzero().flatten()[:5].tolist()}); use float64 or a larger 1 - t")
        return out
