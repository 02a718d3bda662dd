"""``python -m ot_cfm.cli``: the ``ot-cfm`` command line."""

import sys

from ot_cfm.cli import main

sys.exit(main())
