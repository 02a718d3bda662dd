"""torchcfm's ``models.unet`` package: ``UNetModel`` is ``unet.UNetModelWrapper`` (as in torchcfm), and the
modules ``unet``, ``nn``, ``fp16_util`` and ``logger``.

The four modules re-export torchcfm's own, whole (the guided-diffusion UNet that ot-cfm's ``ot_cfm.UNet`` also
holds): the classes are torchcfm's, so checkpoints, hyper-parameters and outputs carry over unchanged.
"""

from ot_cfm.compat.torchcfm.models.unet.unet import UNetModelWrapper as UNetModel

__all__ = ["UNetModel"]
