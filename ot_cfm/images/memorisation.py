"""How close each generated image is to a training image, relative to how close the training images are
to each other (``memorisation_distances``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ot_cfm.utils.validation import check_batch

__all__ = ["MemorisationDistances", "memorisation_distances"]


# ---------------------------------------------------------------- memorisation

@dataclass(frozen=True)
class MemorisationDistances:
    """Each generated sample's nearest training image, all tensors (n,) on the inputs' device.

    distance: Euclidean distance |x_i - y_{index_i}| of sample i to its nearest training image (float64).
    index: that training image's index in ``train`` (int64).
    neighbour_distance: that training image's own distance to its nearest other training image (float64).
    ratio: distance / neighbour_distance. About 0: the sample is a copy of a training image; about 1: it is
        as far from the training set as training images are from each other. 0/0 counts as 0 (a copy of a
        duplicated training image), d/0 with d > 0 as inf.
    """

    distance: torch.Tensor
    index: torch.Tensor
    neighbour_distance: torch.Tensor
    ratio: torch.Tensor


_REFINE = 4  # candidates per row whose distance is recomputed from the difference, immune to the mm's cancellation


def _nearest(queries: torch.Tensor, train: torch.Tensor, chunk_size: int,
             exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest row of train (N, D) to each row of queries (n, D), both float64: distances (n,), indices (n,).

    Per chunk of queries, squared distances |q - m|^2 + |y - m|^2 - 2 <q - m, y - m> (one matrix product on
    data centred at the training mean m, which shrinks the norms that cancel; clamped at 0) pick the
    ``_REFINE`` closest candidates; their distances are then recomputed as |q - y| from the uncentred
    rows, so the returned distance carries no cancellation error (a sample equal to a training image gives
    exactly 0) and a near tie lost to round-off in the product is still resolved. Memory O(chunk_size * N).
    ``exclude`` (n,) names one training index per query that may not be chosen (the query itself).
    """
    mean = train.mean(0)
    centred = train - mean
    centred_sq = centred.square().sum(1)
    k = min(_REFINE, train.shape[0] - (exclude is not None))
    distances, indices = [], []
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start: start + chunk_size]
        qc = q - mean
        sq = (qc.square().sum(1, keepdim=True) + centred_sq - 2.0 * qc @ centred.T).clamp_min_(0.0)
        if exclude is not None:
            sq[torch.arange(q.shape[0], device=q.device), exclude[start: start + chunk_size]] = float("inf")
        candidates = sq.topk(k, dim=1, largest=False).indices                       # (c, k)
        exact = (q.unsqueeze(1) - train[candidates]).norm(dim=2)                    # (c, k)
        best = exact.argmin(1, keepdim=True)
        distances.append(exact.gather(1, best).squeeze(1))
        indices.append(candidates.gather(1, best).squeeze(1))
    return torch.cat(distances), torch.cat(indices)


@torch.no_grad()
def memorisation_distances(samples: torch.Tensor, train: torch.Tensor, *, chunk_size: int = 256) -> MemorisationDistances:
    """Distance of each sample (n, ...) to its nearest training image (N, ...), and its ratio to that image's
    nearest-neighbour distance among the other training images (N >= 2).

    Images are flattened to vectors and compared in float64. Exhaustive search in chunks of ``chunk_size``
    rows: memory O(chunk_size * N), on the inputs' device.
    The training images' own nearest-neighbour distances are computed only for the images that are some
    sample's nearest, so the cost is O((n + unique indices) * N * D).
    """
    check_batch(samples, "samples")
    check_batch(train, "train")
    if samples.shape[1:] != train.shape[1:]:
        raise ValueError(f"samples have per-sample shape {tuple(samples.shape[1:])} and train {tuple(train.shape[1:])}; "
                         "expected the same image shape")
    if train.shape[0] < 2:
        raise ValueError(f"train holds {train.shape[0]} image; expected at least 2 (the ratio needs a nearest "
                         "neighbour among the training images)")
    if samples.device != train.device:
        raise ValueError(f"samples are on {samples.device} but train is on {train.device}; expected one device")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    y = train.detach().flatten(1).to(torch.float64)
    distance, index = _nearest(samples.detach().flatten(1).to(torch.float64), y, chunk_size)
    hit, position = torch.unique(index, return_inverse=True)
    neighbour = _nearest(y[hit], y, chunk_size, exclude=hit)[0][position]
    copy_of_duplicate = torch.where(distance > 0, torch.inf, 0.0).to(torch.float64)
    ratio = torch.where(neighbour > 0, distance / neighbour.clamp_min(torch.finfo(torch.float64).tiny), copy_of_duplicate)
    return MemorisationDistances(distance, index, neighbour, ratio)
