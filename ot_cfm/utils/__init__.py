"""What every other part of ``ot_cfm`` (and ``proximal``) leans on, importing nothing else of the package.

- ``validation``: argument checks that raise a ValueError naming the argument (batches, pairs, labels, times).
- ``atomic``: ``atomic_write``, the one way the package writes a file (a temporary file renamed into place).
- ``parallelism``: CPU cores, worker processes and torch threads (``auto_workers``, ``torch_threads``).
"""

from ot_cfm.utils import atomic, parallelism, validation

__all__ = ["atomic", "parallelism", "validation"]
