"""The trained cells: a model fitted by minibatch OT-CFM at batch size B, scored against the exact field.

Per (target, B, seed) an MLP is trained with ``Trainer`` (exact minibatch coupling, sigma = 0) for
``train_steps`` steps, then scored on ``train_eval_n`` points: ``field_error`` against the potential's velocity
at ``times``, and ``evaluate_samples``: W2 to fresh target samples of Euler samples at 1, 2 and 4 steps and of
adaptive dopri5 samples (with its NFE), the NPE, and the floor W2 between two target samples. The initialisation
and the training seed come from the cell's generator alone.
"""

from __future__ import annotations

import math

import torch

from ot_cfm.couplers.exact import ExactOTCoupler
from ot_cfm.data import gaussian_sampler
from ot_cfm.evaluation import evaluate_samples
from ot_cfm.matcher import ConditionalFlowMatcher
from ot_cfm.models import MLP
from ot_cfm.training import TrainConfig, Trainer
from ot_cfm_experiments.batch_size.cells import Cell, ExperimentConfig
from ot_cfm_experiments.batch_size.targets import Target
from proximal.field import field_error

__all__ = ["measure_trained"]


def _init_mlp(model: torch.nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from ``generator``."""
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            bound = 1 / math.sqrt(layer.in_features)
            torch.nn.init.uniform_(layer.weight, -bound, bound, generator=generator)
            torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def measure_trained(cell: Cell, target: Target, config: ExperimentConfig) -> dict:
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
