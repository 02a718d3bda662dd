"""Scoring passes of the semi-discrete solver (``proximal.semidiscrete``): fresh source samples scored against
the Laguerre cells of duals ``g``, ``s_j(x) = <x, y_j> - g_j``, in chunks of a sample stream.

A pass draws its batch as two independent halves, so ``_Pass.tv`` gives the TV cell-mass error of the current
duals and an estimate of its sampling noise; it also keeps the sums the cost bounds need
(``proximal.semidiscrete_report``) and, with an entropic scale eps, the soft counts and Laplacian of the Newton
solver (``proximal.semidiscrete_solver``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

Source = Callable[[int, torch.Generator], torch.Tensor]

_TOP_K = 8  # soft assignments are kept on each sample's 8 best cells
_HESSIAN_SAMPLES = 2 ** 20  # samples of a batch whose top-k pairs feed the Laplacian (digits: 2^16 stalled)
_GAP_ROWS = 2 ** 12  # the first samples of a pass whose top-k gaps give its gap scale, whatever the chunk size


@dataclasses.dataclass
class _Pass:
    """Sums over one batch, drawn as two independent halves."""

    counts: torch.Tensor  # (2, N) hard cell counts of each half
    n: int
    best_score: float  # sum of max_j <x, y_j> - g_j
    square_norm: float  # sum of |x|^2
    gap_scale: float  # median gap between the best and the k-th best score
    cell_sums: torch.Tensor  # (N, d) sum of the samples x in each hard cell, float64
    cell_squares: torch.Tensor  # (N,) sum of |x|^2 over each hard cell, float64
    radius: float  # largest |x| of the batch
    soft_counts: torch.Tensor | None = None  # (N,) sum of softmax((<x, y> - g) / eps) over the batch
    hessian: torch.Tensor | None = None  # (N, N) Laplacian of the entropic dual, per sample

    @property
    def masses(self) -> torch.Tensor:
        return self.counts.sum(0) / self.n

    def tv(self, weights: torch.Tensor) -> tuple[float, float]:
        half = self.counts / (self.n / 2)
        tv = 0.5 * float((self.masses - weights).abs().sum())
        noise = 0.25 * float((half[0] - half[1]).abs().sum())
        return tv, noise


def _gaussian_qmc(dim: int, seed: int) -> Callable[[int], torch.Tensor]:
    """Randomised QMC stream of N(0, I_dim): scrambled Sobol points through the normal quantile."""
    engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    tiny = 2.0 ** -40

    def draw(n: int) -> torch.Tensor:
        return torch.special.ndtri(engine.draw(n, dtype=torch.float64).clamp_(tiny, 1 - tiny))

    return draw


def _stream(source: Source | None, dim: int, generator: torch.Generator, qmc: bool,
            device: torch.device, dtype: torch.dtype) -> Callable[[int], torch.Tensor]:
    """A fresh, independent sample stream ``draw(n) -> (n, dim)`` on ``device`` / ``dtype``."""
    if source is None and qmc:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        qmc_draw = _gaussian_qmc(dim, seed)
        return lambda n: qmc_draw(n).to(device=device, dtype=dtype)
    if source is None:
        return lambda n: torch.randn(n, dim, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    def draw(n: int) -> torch.Tensor:
        x = source(n, generator)
        if not isinstance(x, torch.Tensor) or x.shape != (n, dim):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"source(n, generator) must return a tensor of shape ({n}, {dim}), got {shape}")
        if not torch.isfinite(x).all():
            raise ValueError("source returned NaN or inf samples")
        return x.to(device=device, dtype=dtype)

    return draw


@torch.no_grad()
def _batch_pass(y: torch.Tensor, g: torch.Tensor, draws: tuple[Callable, Callable], n: int, chunk: int,
                eps: float | None = None, hessian_samples: int = _HESSIAN_SAMPLES, soft: bool = True) -> _Pass:
    """Scores ``s = <x, y_j> - g_j`` of n fresh samples (two halves, in chunks).

    Always: hard cell counts (argmax of s) and sums. With ``eps``: the Laplacian
    ``diag(sum p) - sum p p^T`` of ``p = softmax_j(s / eps)`` on the top-k cells of the first
    ``hessian_samples`` samples, and if ``soft``, the soft counts ``sum_x p`` over all samples.
    Only rows that need soft assignments pay for a top-k; the others take a max.
    """
    num = y.shape[0]
    k = min(_TOP_K, num)
    counts = torch.zeros(2, num, dtype=torch.float64, device=y.device)
    soft_counts = torch.zeros(num, dtype=torch.float64, device=y.device) if eps is not None and soft else None
    pair_weights = torch.zeros(num * num, dtype=torch.float64, device=y.device) if eps is not None else None
    cell_sums = torch.zeros(num, y.shape[1], dtype=torch.float64, device=y.device)
    cell_squares = torch.zeros(num, dtype=torch.float64, device=y.device)
    best_score = square_norm = largest_square = 0.0
    gaps, gap_rows, seen = [], 0, 0
    yt, neg_g = y.T.contiguous(), -g.to(y.dtype)
    for half, draw in enumerate(draws):
        for start in range(0, n // 2, chunk):
            x = draw(min(chunk, n // 2 - start))
            scores = torch.addmm(neg_g, x, yt)
            square_norm += float(x.square().sum(dtype=torch.float64))
            # rows [0, ranked) need their top-k scores: all of them for soft counts, else the Hessian's
            ranked = x.shape[0] if soft_counts is not None or gap_rows < _GAP_ROWS else \
                (min(x.shape[0], hessian_samples - seen) if pair_weights is not None else 0)
            best, arg = scores[ranked:].max(1)
            best_score += float(best.sum(dtype=torch.float64))
            top = idx = None
            if ranked:
                top, idx = scores[:ranked].topk(k, dim=1)
                best_score += float(top[:, 0].sum(dtype=torch.float64))
            cells = arg if idx is None else torch.cat([idx[:, 0], arg])  # hard cell of each row
            counts[half] += torch.bincount(cells, minlength=num)
            x64 = x.to(torch.float64)
            cell_sums.index_add_(0, cells, x64)
            squares = x64.square().sum(1)
            cell_squares.index_add_(0, cells, squares)
            largest_square = max(largest_square, float(squares.max()))
            if ranked == 0:
                continue
            if gap_rows < _GAP_ROWS:
                gaps.append((top[:, 0] - top[:, -1])[:_GAP_ROWS - gap_rows])
                gap_rows += gaps[-1].shape[0]
            if eps is None:
                continue
            p = torch.softmax((top - top[:, :1]).double() / eps, dim=1)
            if soft_counts is not None:
                soft_counts.index_add_(0, idx.flatten(), p.flatten())
            take = max(0, min(ranked, hessian_samples - seen))
            if take:
                keys = (idx[:take, :, None] * num + idx[:take, None, :]).flatten()
                pair_weights.index_add_(0, keys, (p[:take, :, None] * p[:take, None, :]).flatten())
                seen += take
    hessian = None
    if eps is not None:
        pair = pair_weights.reshape(num, num)
        hessian = (torch.diag(pair.sum(1)) - pair) / (eps * max(seen, 1))
    gap_scale = float(torch.cat(gaps).median()) if k > 1 and gaps else 1.0
    return _Pass(counts, n, best_score, square_norm, gap_scale, cell_sums, cell_squares, math.sqrt(largest_square),
                 soft_counts, hessian)
