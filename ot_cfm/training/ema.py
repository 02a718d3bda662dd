"""The exponential moving average of the weights, with a warm-up of its decay.

At the first step the average is the model's weights W_1 (``torch.optim.swa_utils.AveragedModel`` copies them);
at each later step s = 2, 3, ... it moves towards the model's weights W_s:

    W_ema <- d_k W_ema + (1 - d_k) W_s,   k = s - 1 (updates averaged so far),
    d_k = min(decay, (1 + k) / (10 + k))   with the warm-up,   d_k = decay   without.

With a constant decay of 0.999, after 200 steps W_ema still holds 0.999^199 = 82 % of the first step's (nearly
untrained) weights; with the warm-up a short run's average follows the model (d = 0.957 at step 200) and the
decay reaches 0.999 after about 9000 steps, as diffusion codebases do. k is the average's own counter
(``n_averaged``), saved in checkpoints, so a resumed run continues the same schedule.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["ema_decay_at", "exponential_moving_average"]


def ema_decay_at(k: int, decay: float, warmup: bool) -> float:
    """The decay d_k of the k-th averaging update (k >= 1; see the module)."""
    return min(decay, (1 + k) / (10 + k)) if warmup else decay


class _Update:
    """AveragedModel's ``multi_avg_fn``: lerp every floating tensor towards the model's by 1 - d_k."""

    def __init__(self, decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup

    @torch.no_grad()
    def __call__(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        weight = 1.0 - ema_decay_at(int(num_averaged), self.decay, self.warmup)
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            torch._foreach_lerp_(averaged, current, weight)
        else:  # integer buffers: the same average, rounded by copy_
            for a, c in zip(averaged, current, strict=True):
                a.copy_(a * (1.0 - weight) + c * weight)


def exponential_moving_average(model: nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """An ``AveragedModel`` of ``model`` updated as the module describes (``update_parameters(model)`` after each
    step); its ``module`` holds the averaged weights."""
    return AveragedModel(model, multi_avg_fn=_Update(decay, warmup))
