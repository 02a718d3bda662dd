"""Sample quality of a trained field at several numbers of function evaluations (NFE)."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field

import torch

from ot_cfm.evaluation.metrics import normalized_path_energy, wasserstein2
from ot_cfm.solvers.ode import sample

__all__ = ["SampleQuality", "evaluate_samples", "model_device"]


@dataclass(frozen=True)
class SampleQuality:
    """W2 of generated against fresh target samples per solver setting, NPE of the adaptive flow,
    and the reference W2 between two independent target samples of the same size (the noise floor)."""

    w2: dict = dataclass_field(default_factory=dict)    # label -> W2, labels "euler-1", ..., "dopri5"
    nfe: dict = dataclass_field(default_factory=dict)   # label -> NFE used
    npe: float = float("nan")
    w2_floor: float = float("nan")

    def as_dict(self) -> dict:
        out = {f"w2/{k}": v for k, v in self.w2.items()}
        out.update({f"nfe/{k}": float(v) for k, v in self.nfe.items()})
        out.update(npe=self.npe, w2_floor=self.w2_floor)
        return out

    def to_markdown(self) -> str:
        rows = ["| solver | NFE | W2 |", "| --- | --- | --- |"]
        rows += [f"| {k} | {self.nfe[k]} | {v:.4f} |" for k, v in self.w2.items()]
        rows.append(f"\nNPE (adaptive flow): {self.npe:.4f}; W2 between two target samples (floor): {self.w2_floor:.4f}")
        return "\n".join(rows)


@torch.no_grad()
def evaluate_samples(model, source, target, *, n: int = 2000, euler_nfes=(1, 2, 4, 8), adaptive: bool = True,
                     atol: float = 1e-5, rtol: float = 1e-5, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> tuple[SampleQuality, dict]:
    """Sample n points with Euler at each NFE in ``euler_nfes`` and with dopri5, compare with n fresh target points.

    Returns the SampleQuality and a dict of tensors for plotting: source, target, generated (dopri5,
    or Euler with the last NFE of ``euler_nfes``), and the dopri5 trajectory (101, n, *shape) when ``adaptive``.

    The points are drawn where the samplers draw (the CPU for ``ot_cfm.data``'s, so the same points on every
    device); the flow is integrated on ``device`` (default: the device of ``model``'s parameters, the CPU for
    a model without any, e.g. a guided-field closure), and the metrics and returned tensors are on the CPU.
    """
    device = model_device(model) if device is None else torch.device(device)
    x0, x1 = source(n, generator).cpu(), target(n, generator).cpu()
    floor = wasserstein2(x1, target(n, generator).cpu())
    w2, nfe, npe, tensors = {}, {}, float("nan"), {"source": x0, "target": x1}
    start = x0.to(device)
    for k in euler_nfes:
        out = sample(model, start, solver="euler", steps=k)
        generated = out.x.cpu()
        w2[f"euler-{k}"], nfe[f"euler-{k}"], tensors["generated"] = wasserstein2(generated, x1), out.nfe, generated
    if adaptive:
        out = sample(model, start, solver="dopri5", atol=atol, rtol=rtol)
        generated = out.x.cpu()
        w2["dopri5"], nfe["dopri5"], tensors["generated"] = wasserstein2(generated, x1), out.nfe, generated
        path = sample(model, start, solver="dopri5", atol=atol, rtol=rtol, return_trajectory=True)
        tensors["trajectory"] = path.trajectory.cpu()
        npe = normalized_path_energy(tensors["trajectory"], path.times.cpu(), wasserstein2(x0, x1) ** 2)
    return SampleQuality(w2=w2, nfe=nfe, npe=npe, w2_floor=floor), tensors


def model_device(model) -> torch.device:
    """The device of a module's parameters; the CPU for a callable without any (e.g. a guided-field closure)."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return torch.device("cpu") if first is None else first.device
