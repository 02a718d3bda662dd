"""Classifier-free guidance: v = v(t, x, null) + scale (v(t, x, y) - v(t, x, null)) (Ho and Salimans,
"Classifier-free diffusion guidance", 2022; Zheng et al., "Guided flows for generative modeling and decision
making", 2023, for flow matching)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ot_cfm.models.field import as_label_tensor, is_conditional
from ot_cfm.utils.validation import as_time_tensor

__all__ = ["guided_field"]


class _GuidedField:
    def __init__(self, model: nn.Module, y, scale: float):
        self.model, self.y, self.scale = model, y, scale

    def __call__(self, t, x):
        m, s = self.model, self.scale
        if s == 1.0:
            return m(t, x, self.y)
        if s == 0.0:
            return m(t, x, m.null_label)
        y = as_label_tensor(self.y, x, m.num_classes)
        t = as_time_tensor(t, x)
        both = m(torch.cat([t, t]), torch.cat([x, x]), torch.cat([y, torch.full_like(y, m.null_label)]))
        v_cond, v_uncond = both.chunk(2)
        return (1.0 - s) * v_uncond + s * v_cond


def guided_field(model: nn.Module, y: torch.Tensor | int, scale: float = 1.0) -> Callable:
    """Classifier-free guidance: the field(t, x) = v(t, x, null) + scale (v(t, x, y) - v(t, x, null)).

    Computed as (1 - scale) v_uncond + scale v_cond, so scale 0 is exactly the unconditional field and scale 1
    exactly the conditional one (each then takes a single model call); other scales evaluate both halves in one
    call on a doubled batch. Scales above 1 sharpen the classes (typical values 1 to 3).

    Args:
        model: a conditional model (``is_conditional(model)``), such as ``MLP(..., num_classes=K)`` or ``UNet``.
        y: one int or labels of shape (B,) matching the batch the field will be called with; ``model.null_label``
            asks for the unconditional field.
        scale: guidance scale, a finite float.
    """
    if not is_conditional(model) or getattr(model, "null_label", None) is None:
        raise ValueError(f"guided_field needs a class-conditional model with a null label (num_classes set, e.g. "
                         f"MLP(..., num_classes=K) or unet_for(shape, num_classes=K)), got {type(model).__name__} "
                         f"with num_classes={getattr(model, 'num_classes', None)}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float, got {scale}")
    return _GuidedField(model, y, scale)
