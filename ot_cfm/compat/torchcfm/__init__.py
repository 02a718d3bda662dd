"""torchcfm's API on ot-cfm: change ``from torchcfm...`` to ``from ot_cfm.compat.torchcfm...`` and nothing else.

Same modules (``conditional_flow_matching``, ``optimal_transport``, ``models`` with ``models.unet``, ``utils``,
``version``), class and function names and signatures as torchcfm 1.0.7 (``__version__``); the matchers are
ot-cfm's (``ot_cfm.matcher``, ``ot_cfm.paths``) and the plans come from ot-cfm's couplers (exact OT certified
by LP duality, log-domain Sinkhorn). The UNet (``models.unet``) is torchcfm's own. As torchcfm's, the package
itself has the names of ``conditional_flow_matching`` (``import *`` included) and the modules.

Where ot-cfm deliberately differs:

- the exact plan is used as a permutation: ``OTPlanSampler("exact").sample_plan(x0, x1)`` returns every x0 once,
  in its order, with its optimal partner (torchcfm draws B pairs from the plan with replacement, so some points
  repeat and others are dropped). Pass ``replace=True`` for torchcfm's sampling.
- a plan that is not finite or has no mass raises an error instead of falling back, with a warning, to the
  uniform (independent) plan.

A hydra config whose ``_target_`` names ``torchcfm.`` still builds torchcfm's objects: ``check_config_targets``
finds them.
"""

from collections.abc import Mapping, Sequence

from ot_cfm.compat.torchcfm import conditional_flow_matching, optimal_transport, version
from ot_cfm.compat.torchcfm.conditional_flow_matching import *  # noqa: F403  (torchcfm's package does the same)

__version__ = version.__version__
__all__ = [*conditional_flow_matching.__all__, "conditional_flow_matching", "optimal_transport", "version",
           "check_config_targets"]


def check_config_targets(config, where: str = "config") -> None:
    """ValueError if a ``_target_`` in ``config`` names torchcfm (``torchcfm`` or ``torchcfm.X``), which hydra's
    ``instantiate`` would build from torchcfm itself; the message gives each key and its drop-in replacement.

    ``config``: nested mappings and lists, e.g. ``OmegaConf.to_container(cfg)`` or a loaded YAML file; ``where``
    names its root in the message.
    """
    found = []

    def visit(node, path):
        if isinstance(node, Mapping):
            target = node.get("_target_")
            if isinstance(target, str) and (target == "torchcfm" or target.startswith("torchcfm.")):
                found.append(f"{path}._target_: {target} -> ot_cfm.compat.{target}")
            for key, value in node.items():
                visit(value, f"{path}.{key}")
        elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
            for k, value in enumerate(node):
                visit(value, f"{path}[{k}]")

    visit(config, where)
    if found:
        raise ValueError("these _target_ entries build torchcfm's objects, not the drop-in's; point them at "
                         "ot_cfm.compat.torchcfm:\n  " + "\n  ".join(found))
