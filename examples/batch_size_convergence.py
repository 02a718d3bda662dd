"""Batch-size convergence of minibatch OT-CFM (issue 5): errors against B, slopes, figures.

    python examples/batch_size_convergence.py --train --train-seeds 1 --out examples/results   # the committed run
    python examples/batch_size_convergence.py --quick             # under a minute, writes runs/batch_size

Same options as ``ot-cfm experiment batch-size``; ``--help`` lists them.
"""

import sys

from ot_cfm_experiments.batch_size import main

if __name__ == "__main__":
    sys.exit(main(prog="python examples/batch_size_convergence.py"))
