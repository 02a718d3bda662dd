"""torchcfm's ``models``: ``MLP`` and ``GradModel`` (``models.models``, on ot-cfm's layers) and the ``unet``
package (torchcfm's own UNet; ``UNetModel`` here too, for scripts that import it from ``models``)."""

from ot_cfm.compat.torchcfm.models import models, unet
from ot_cfm.compat.torchcfm.models.models import MLP, GradModel
from ot_cfm.compat.torchcfm.models.unet import UNetModel

# torchcfm's ``import *`` brings MLP and its submodules; GradModel and UNetModel are ot-cfm's additions
__all__ = ["MLP", "models", "unet", "GradModel", "UNetModel"]
