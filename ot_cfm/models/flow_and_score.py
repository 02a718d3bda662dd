"""A flow network and a score network as one model, and rebuilding any model from its ``config``."""

from __future__ import annotations

import torch
from torch import nn

from ot_cfm.models.image_unet import UNet
from ot_cfm.models.mlp import MLP

__all__ = ["FlowAndScore", "model_from_config"]


class FlowAndScore(nn.Module):
    """A flow network and a score network as one model (Schrodinger-bridge CFM, ``ot_cfm.solvers.sde``).

    ``model(t, x[, y])`` is the flow v(t, x), so the model samples like any other with ``ot_cfm.solvers.ode.sample``;
    ``model.score(t, x[, y])`` estimates the score grad_x log p_t(x), (B, *shape), trained by the matcher's
    loss (its score term) and used by ``ot_cfm.solvers.sde.sample_sde`` as dx = [v + sigma^2 / 2 s] dt + sigma dW.

    Args:
        flow, score: models under the model contract (e.g. two ``MLP(dim)``), both unconditional or both
            conditional with the same ``num_classes``.
    """

    def __init__(self, flow: nn.Module, score: nn.Module):
        super().__init__()
        if getattr(flow, "num_classes", None) != getattr(score, "num_classes", None):
            raise ValueError(f"flow and score must take the same labels, got num_classes "
                             f"{getattr(flow, 'num_classes', None)} (flow) and {getattr(score, 'num_classes', None)} "
                             "(score)")
        self.flow_net, self.score_net = flow, score
        self.num_classes = getattr(flow, "num_classes", None)

    @property
    def null_label(self) -> int | None:
        """The label meaning "unconditional" (``num_classes``); None for an unconditional model."""
        return self.num_classes

    @property
    def config(self) -> dict:
        """kind "flow_and_score" with both networks' configs: ``model_from_config`` rebuilds it."""
        return dict(kind="flow_and_score", flow=self.flow_net.config, score=self.score_net.config)

    def forward(self, t: torch.Tensor | float, x: torch.Tensor, y: torch.Tensor | int | None = None) -> torch.Tensor:
        return self.flow_net(t, x) if y is None else self.flow_net(t, x, y)

    def score(self, t: torch.Tensor | float, x: torch.Tensor, y: torch.Tensor | int | None = None) -> torch.Tensor:
        """The score estimate s(t, x) ~ grad_x log p_t(x), x's shape."""
        return self.score_net(t, x) if y is None else self.score_net(t, x, y)


def model_from_config(config: dict) -> nn.Module:
    """Build an untrained MLP, UNet or FlowAndScore from ``model.config`` (a dict of plain values, storable in
    checkpoints)."""
    if not isinstance(config, dict) or config.get("kind") not in ("mlp", "unet", "flow_and_score"):
        raise ValueError(f"config must be a dict with kind 'mlp', 'unet' or 'flow_and_score' (a model's .config), "
                         f"got {config!r}")
    if config["kind"] == "flow_and_score":
        return FlowAndScore(model_from_config(config["flow"]), model_from_config(config["score"]))
    args = {k: v for k, v in config.items() if k != "kind"}
    if config["kind"] == "mlp":
        return MLP(**args)
    return UNet(**{**args, "shape": tuple(args["shape"]), "channel_mult": tuple(args["channel_mult"]),
                   "attention": tuple(args["attention"])})
