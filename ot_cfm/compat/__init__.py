"""Adapters that present ot-cfm under other libraries' APIs: ``ot_cfm.compat.torchcfm`` mirrors torchcfm (its
modules ``conditional_flow_matching``, ``optimal_transport``, ``models`` and ``utils``). Nothing is exported here."""
