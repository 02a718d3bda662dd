"""Adapters that present ot-cfm under other libraries' APIs: ``ot_cfm.compat.torchcfm`` mirrors torchcfm."""
