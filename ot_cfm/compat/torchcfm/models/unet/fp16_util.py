"""torchcfm's ``models.unet.fp16_util``: mixed-precision helpers (``MixedPrecisionTrainer``,
``convert_module_to_f16``, ...).

Every public name of torchcfm's module, the very same objects: it has no ``__all__``, so this star import
brings what ``from torchcfm.models.unet.fp16_util import *`` brings, the modules it imports included.
"""

from torchcfm.models.unet.fp16_util import *  # noqa: F403
