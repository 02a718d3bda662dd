"""The model contract, shared by every field of this package (learned or exact), and what checks it.

- ``model(t, x)`` with ``t`` a float, a 0-d or one-element tensor (as ODE solvers pass it) or a (B,) tensor, and
  ``x`` of shape (B, *shape), returns the velocity, of shape (B, *shape).
- A class-conditional model has an integer attribute ``num_classes`` (K) and is called ``model(t, x, y)`` with
  ``y`` an integer tensor of shape (B,) (or one int for the whole batch) holding labels in 0 .. K. The label
  ``K`` (the attribute ``null_label``) is reserved: it means "no class", the unconditional field, and is what
  label dropout substitutes during training so that one network learns both fields. The label embedding
  therefore has K + 1 rows. ``is_conditional(model)`` tells the two kinds apart (``num_classes`` is None or
  absent on an unconditional model); a conditional model called without ``y``, or an unconditional one called
  with it, raises ``ValueError``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_conditional", "has_score", "as_label_tensor", "drop_labels", "FieldModel"]



def is_conditional(model) -> bool:
    """True when ``model`` is class-conditional (called ``model(t, x, y)``), i.e. has a ``num_classes`` set."""
    return getattr(model, "num_classes", None) is not None


def has_score(model) -> bool:
    """True when ``model`` has a score head: a callable ``model.score(t, x)`` (``model.score(t, x, y)`` when
    conditional) estimating grad_x log p_t(x), as ``FlowAndScore`` has."""
    return callable(getattr(model, "score", None))


def as_label_tensor(y, like: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Turn one int or an integer tensor of shape (B,) into int64 labels of shape (B,) on ``like``'s device,
    checking that each lies in 0 .. num_classes (``num_classes`` itself being the null, unconditional label)."""
    batch = like.shape[0]
    if isinstance(y, bool) or (isinstance(y, torch.Tensor) and y.dtype == torch.bool):
        raise ValueError("y must hold integer class labels, got booleans")
    if isinstance(y, int):
        y = torch.full((batch,), y, dtype=torch.long, device=like.device)
    elif isinstance(y, torch.Tensor):
        if y.is_floating_point() or y.is_complex():
            raise ValueError(f"y must be an integer tensor of class labels, got dtype {y.dtype}")
        if y.shape != (batch,):
            raise ValueError(f"y must be one int or a tensor of shape ({batch},) (one label per sample of x), "
                             f"got shape {tuple(y.shape)}")
        y = y.to(device=like.device, dtype=torch.long)
    else:
        raise ValueError(f"y must be an int or an integer tensor of shape ({batch},), got {type(y).__name__}")
    bad = (y < 0) | (y > num_classes)
    if bad.any():
        raise ValueError(f"labels must lie in 0 .. {num_classes - 1} (classes) or be {num_classes} (the null label, "
                         f"unconditional), got {y[bad][:5].tolist()}")
    return y


def check_label_args(num_classes: int | None) -> None:
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be None (unconditional) or an int >= 1, got {num_classes!r}")


def labels_for(model: nn.Module, y, x: torch.Tensor) -> torch.Tensor | None:
    """The forward passes' shared check: labels exactly when the model is conditional."""
    name = type(model).__name__
    if model.num_classes is None:
        if y is not None:
            raise ValueError(f"this {name} is unconditional (num_classes=None) but was given labels y; "
                             "call it as model(t, x) or build it with num_classes")
        return None
    if y is None:
        raise ValueError(f"this {name} is class-conditional (num_classes={model.num_classes}): call it as "
                         f"model(t, x, y); y = {model.null_label} (the null label) gives the unconditional field")
    return as_label_tensor(y, x, model.num_classes)


def drop_labels(y: torch.Tensor, probability: float, null_label: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each label becomes ``null_label`` with ``probability``.

    The draw uses ``generator`` (on y's device), never the global generator when one is given.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {probability}")
    if probability == 0.0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < probability
    return torch.where(drop, torch.full_like(y, null_label), y)



class FieldModel(nn.Module):
    """What MLP and UNet share: ``num_classes`` (None: unconditional) and the constructor's ``_config``."""

    num_classes: int | None
    _config: dict

    @property
    def null_label(self) -> int | None:
        """The label meaning "unconditional" (``num_classes``); None for an unconditional model."""
        return self.num_classes

    @property
    def config(self) -> dict:
        """The constructor's arguments plus ``kind``: ``model_from_config(model.config)`` builds the same network."""
        return dict(self._config)
