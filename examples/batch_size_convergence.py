"""Batch-size convergence of minibatch OT-CFM (issue 5): errors against B, slopes, figures.

    python examples/batch_size_convergence.py --train            # the full run (see examples/results/batch_size.md)
    python examples/batch_size_convergence.py --quick --out quick_results   # under a minute

Same options as ``ot-cfm experiment batch-size``; ``--help`` lists them.
"""

import sys

from ot_cfm.experiments.batch_size import main

if __name__ == "__main__":
    sys.exit(main())
