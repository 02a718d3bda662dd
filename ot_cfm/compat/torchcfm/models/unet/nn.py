"""torchcfm's ``models.unet.nn``: the layers and helpers of the UNet (``timestep_embedding``,
``conv_nd``, ``zero_module``, ...).

Every public name of torchcfm's module, the very same objects: it has no ``__all__``, so this star import
brings what ``from torchcfm.models.unet.nn import *`` brings, the modules it imports included.
"""

from torchcfm.models.unet.nn import *  # noqa: F403
