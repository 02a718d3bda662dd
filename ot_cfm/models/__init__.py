"""Vector-field models v(t, x): an MLP for vectors and torchcfm's UNet for images, both optionally class-conditional.

Every model follows the model contract (``ot_cfm.models.field``): ``model(t, x)``, or ``model(t, x, y)`` with
labels in 0 .. K for a class-conditional model, K being the null (unconditional) label.

- ``field``: the contract's checks (``is_conditional``, ``has_score``, ``as_label_tensor``, ``drop_labels``) and
  the base class of MLP and UNet.
- ``mlp``: ``MLP``, ``mlp_layers``, ``SinusoidalTimeEmbedding``.
- ``image_unet``: ``UNet``, ``unet_for`` with ``UNET_PRESETS`` by image size (8x8 digits, 28x28 MNIST, 32x32 CIFAR-10).
- ``flow_and_score``: ``FlowAndScore`` (flow and score heads, for Schrodinger-bridge CFM) and
  ``model_from_config`` (rebuild any of them from ``model.config``).
- ``guidance``: ``guided_field``, classifier-free guidance of a conditional model.
"""

from ot_cfm.models.field import as_label_tensor, drop_labels, has_score, is_conditional
from ot_cfm.models.flow_and_score import FlowAndScore, model_from_config
from ot_cfm.models.guidance import guided_field
from ot_cfm.models.image_unet import UNET_PRESETS, UNet, UNetPreset, unet, unet_for
from ot_cfm.models.mlp import ACTIVATIONS, MLP, SinusoidalTimeEmbedding, mlp_layers

__all__ = ["ACTIVATIONS", "mlp_layers", "MLP", "SinusoidalTimeEmbedding", "UNet", "UNetPreset", "UNET_PRESETS", "unet_for",
           "unet", "is_conditional", "has_score", "FlowAndScore", "as_label_tensor", "drop_labels", "guided_field",
           "model_from_config"]
