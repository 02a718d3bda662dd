"""Test-wide settings.

The tests run many small tensor operations; on a 2-core machine with other load, torch's
intra-op threading makes those 6-10x slower than one thread (measured), so the suite uses one.
"""

import torch

torch.set_num_threads(1)
