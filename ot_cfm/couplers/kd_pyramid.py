"""The k-d order of a batch and the pyramid of pair-averaged costs that ``ot_cfm.couplers.multiscale``
solves from the top down.

In k-d order consecutive aligned blocks of 2^l points are spatial clusters; averaging consecutive pairs
of rows and columns of a cost C = -<x_i, y_j> then gives the cost of the pairs' means (-<x, y> is
bilinear), a problem of half the size whose duals approximate the full one's up to the scale of a pair.
Compiled with numba (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["kd_order", "coarsen", "c_transform"]


@njit(cache=True)
def kd_order(points):
    """The k-d order (n,) of points (n, d): a range of s > 1 points is sorted along its widest coordinate
    and split after its first 2^(ceil(log2 s) - 1), recursively; aligned blocks of 2^l are then subtrees."""
    n = points.shape[0]
    order = np.arange(n)
    stack = np.empty((2 * n + 2, 2), np.int64)
    stack[0, 0], stack[0, 1] = 0, n
    top = 1
    while top > 0:
        top -= 1
        lo, hi = stack[top, 0], stack[top, 1]
        size = hi - lo
        if size <= 1:
            continue
        widest, spread = 0, -1.0
        for k in range(points.shape[1]):
            low, high = np.inf, -np.inf
            for t in range(lo, hi):
                value = points[order[t], k]
                low, high = min(low, value), max(high, value)
            if high - low > spread:
                widest, spread = k, high - low
        keys = np.empty(size)
        for t in range(size):
            keys[t] = points[order[lo + t], widest]
        order[lo:hi] = order[lo:hi][np.argsort(keys, kind="mergesort")]
        half = 1
        while 2 * half < size:
            half *= 2
        stack[top, 0], stack[top, 1] = lo, lo + half
        stack[top + 1, 0], stack[top + 1, 1] = lo + half, hi
        top += 2
    return order


@njit(cache=True)
def coarsen(C):
    """(pairs (m, n), coarse (m, m)), m = ceil(n / 2): the means of consecutive rows of C (n, n) (a last
    odd row alone), and of consecutive columns of those."""
    n = C.shape[0]
    m = (n + 1) // 2
    pairs = np.empty((m, n))
    for c in range(m):
        last = min(2 * c + 1, n - 1)
        for j in range(n):
            pairs[c, j] = 0.5 * (C[2 * c, j] + C[last, j])
    coarse = np.empty((m, m))
    for c in range(m):
        for t in range(m):
            last = min(2 * t + 1, n - 1)
            coarse[c, t] = 0.5 * (pairs[c, 2 * t] + pairs[c, last])
    return pairs, coarse


@njit(cache=True)
def c_transform(pairs, u):
    """v_j = min_c (pairs_cj - u_c) for pairs (m, n), u (m,)."""
    v = np.full(pairs.shape[1], np.inf)
    for c in range(pairs.shape[0]):
        for j in range(pairs.shape[1]):
            v[j] = min(v[j], pairs[c, j] - u[c])
    return v
