"""torchcfm's ``models.unet``: ``UNetModel`` is torchcfm's UNet wrapper itself (the network that ot-cfm's
``ot_cfm.UNet`` holds and calls as ``model(t, x[, y])``), so checkpoints and hyper-parameters carry over."""

from torchcfm.models.unet import UNetModel

__all__ = ["UNetModel"]
