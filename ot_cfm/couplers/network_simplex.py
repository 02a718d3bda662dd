"""POT's exact network simplex (``ot.emd``) with an iteration cap that never stops it silently.

POT's default cap (1e5 iterations) binds from B = 2048 and then returns a suboptimal plan with only a
warning; here the cap is high enough never to bind on minibatches, and any result other than
"optimal" raises.
"""

from __future__ import annotations

import numpy as np
import ot

__all__ = ["network_simplex"]

EMD_MAX_ITER = 10**10


def network_simplex(cost, a: np.ndarray | None = None, b: np.ndarray | None = None):
    """(plan, u, v): the optimal plan and duals for a dense (n0, n1) float64 array or a scipy sparse
    cost (missing arcs are forbidden), masses a (n0,), b (n1,) (uniform when None).

    The plan comes as POT returns it (dense array, or sparse for a sparse cost); u (n0,), v (n1,) are
    numpy arrays with u_i + v_j <= C_ij and equality on the plan's support. Raises RuntimeError
    unless POT reports an optimal solution.
    """
    n0, n1 = cost.shape
    a = np.full(n0, 1.0 / n0) if a is None else a
    b = np.full(n1, 1.0 / n1) if b is None else b
    plan, log = ot.emd(a, b, cost, numItermax=EMD_MAX_ITER, log=True)
    if log["result_code"] != 1:
        raise RuntimeError(f"POT emd did not reach an optimal plan (result_code {log['result_code']}: "
                           f"{log.get('warning')}) for a {n0}x{n1} problem")
    return plan, log["u"], log["v"]
