"""Terminal normal hyperbolicity of exact, learned and empirical OT-CFM fields on manifolds.

The logic lives in ``manifold_tests.experiment`` (also ``ot-cfm manifold``); see its docstring.
Usage: ``python examples/manifold_hyperbolicity.py [--quick] [--manifold NAME] [--out DIR]``.
"""

from manifold_tests.experiment import main

if __name__ == "__main__":
    raise SystemExit(main())
