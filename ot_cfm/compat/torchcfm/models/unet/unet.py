"""torchcfm's ``models.unet.unet``: ``UNetModel`` (the guided-diffusion UNet, called
``model(t, x, y)``), ``UNetModelWrapper`` (its constructor from ``dim=(C, H, W)``, as torchcfm's CIFAR-10
scripts build it), their blocks and ``NUM_CLASSES``.

Every public name of torchcfm's module, the very same objects: it has no ``__all__``, so this star import
brings what ``from torchcfm.models.unet.unet import *`` brings, the modules it imports included.
"""

from torchcfm.models.unet.unet import *  # noqa: F403
