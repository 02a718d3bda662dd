"""POT's exact network simplex (``ot.emd``) with an iteration cap that never stops it silently, and
the optimality certificate that checks its answers.

POT's default cap (1e5 iterations) binds from B = 2048 and then returns a suboptimal plan with only a
warning; here the cap is high enough never to bind on minibatches, and any result other than
"optimal" raises. POT's "optimal" is not enough on its own: its pivoting compares reduced costs with
absolute tolerances, so on costs far from unit scale (points scaled by 1e-6, or a common offset that
cancels in the cost) it stops at plans tens of percent above the optimum. The callers therefore solve
centred and scaled batches (``ot_cfm.couplers.base.centre_and_scale``) and ``certify`` the returned
plan with its duals on the full cost (LP duality, see there).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["network_simplex", "certify", "certificate_tolerance", "CERTIFICATE_TOL"]

EMD_MAX_ITER = 10**10
#: tolerance of the optimality certificate relative to max_i |x_i|^2 + max_j |y_j|^2 of the centred and
#: scaled batches (entries in [-1, 1]). The rounding of POT's duals measured there: 1e-13 to 5e-13 of
#: that at B = 1024 to 4096, d = 2 to 784, and 1.1e-12 at B = 4096, d = 3072; the GEMM that forms the
#: reduced costs adds about sqrt(d) 1e-16. Far below it, far below any cost gap that matters.
CERTIFICATE_TOL = 1e-10


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
    import ot  # here, not at module level: importing POT loads scikit-learn (about a second)
    plan, log = ot.emd(a, b, cost, numItermax=EMD_MAX_ITER, log=True)
    if log["result_code"] != 1:
        raise RuntimeError(f"POT emd did not reach an optimal plan (result_code {log['result_code']}: "
                           f"{log.get('warning')}) for a {n0}x{n1} problem")
    return plan, log["u"], log["v"]


def certificate_tolerance(sq_norms_x: torch.Tensor, sq_norms_y: torch.Tensor) -> float:
    """The certificate's absolute tolerance for batches with squared norms sq_norms_x (n0,), sq_norms_y
    (n1,): ``CERTIFICATE_TOL * max(max |x|^2 + max |y|^2, 1)``, in the batches' cost units."""
    return CERTIFICATE_TOL * max(float(sq_norms_x.max() + sq_norms_y.max()), 1.0)


def certify(reduced: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, tol: float, *, solver: str) -> None:
    """Check that duals (u, v) prove a plan optimal, from the reduced costs R = C - u - v on the full
    (n0, n1) grid and the plan's support, the arcs (rows[k], cols[k]).

    If R >= -tol everywhere and R <= tol on the support, then (u, v - tol) is dual feasible and, with
    marginals a, b, the plan's cost sum P C = <a, u> + <b, v> + sum P R is at most 2 tol above the
    optimum per unit of transported mass (LP duality). Raises RuntimeError, naming ``solver``, otherwise.
    """
    below = float(reduced.min())
    on_plan = float(reduced[rows, cols].max())
    if on_plan > tol or below < -tol:
        raise RuntimeError(
            f"{solver} returned a plan that fails its optimality certificate: the reduced costs C - u - v "
            f"reach {below:.3e} over all arcs and {on_plan:.3e} on the plan's arcs, expected >= -{tol:.1e} and "
            f"<= {tol:.1e} (units of the centred, scaled cost), so the plan may cost up to "
            f"{max(on_plan, 0.0) + max(-below, 0.0):.1e} per unit mass above the optimum. For equal uniform "
            "batches ExactOTCoupler(backend='scipy') solves without POT; please report the batch that caused this.")
