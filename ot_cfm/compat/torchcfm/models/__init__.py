"""torchcfm's ``models``: ``MLP`` and ``UNetModel`` (torchcfm's own UNet, which ot-cfm's ``UNet`` also wraps)."""

from ot_cfm.compat.torchcfm.models.models import MLP, GradModel
from ot_cfm.compat.torchcfm.models.unet import UNetModel

__all__ = ["MLP", "GradModel", "UNetModel"]
