"""Test-wide settings.

The tests run many small tensor operations; on a 2-core machine with other load, torch's
intra-op threading makes those 6-10x slower than one thread (measured), so the suite uses one.
Tests that draw from torch's global generator (library code never does) get it seeded per test,
so their inputs do not depend on which tests ran before.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_global_generator():
    torch.manual_seed(0)
