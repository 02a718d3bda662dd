"""torchcfm's ``models.unet.logger``: the guided-diffusion logger (``configure``, ``logkv``,
``dumpkvs``, ...); its state is torchcfm's logger's, where ``fp16_util`` logs.

Every public name of torchcfm's module, the very same objects: it has no ``__all__``, so this star import
brings what ``from torchcfm.models.unet.logger import *`` brings, the modules it imports included.
"""

from torchcfm.models.unet.logger import *  # noqa: F403
