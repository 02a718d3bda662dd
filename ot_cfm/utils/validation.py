"""Input checks shared by every public entry point of the three packages.

Each check raises ``ValueError`` naming what was received and what was expected;
nothing here asserts, so checks survive ``python -O``.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = ["check_batch", "check_pair", "check_labels", "check_time", "expand_like", "as_time_tensor", "check_images",
           "check_int64_labels", "MAX_CLASSES", "check_class_array", "MAX_SEED", "check_seed"]


#: the most classes a loaded file may label: labels must lie in 0..MAX_CLASSES - 1. A class-conditional model
#: embeds max label + 2 rows (the classes and the null label) and the image loaders name every class, so a label
#: read from a file bounds memory; 100 000 is several times ImageNet-21k's 21 841 classes.
MAX_CLASSES = 100_000

#: the largest seed: seeds are integers in [0, 2**63 - 1] (int64, what every generator takes without wrapping)
MAX_SEED = 2**63 - 1


def check_batch(x: torch.Tensor, name: str = "x", *, min_ndim: int = 2) -> torch.Tensor:
    """Check a batch of shape (B, *shape): a floating tensor, B > 0, all entries finite."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, *shape), got {type(x).__name__}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions (B, *shape), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); expected at least one sample")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} contains NaN or inf (first bad rows: {bad}); expected finite values")
    return x


def check_pair(x0: torch.Tensor, x1: torch.Tensor, *, same_batch_size: bool = True,
               names: tuple[str, str] = ("x0", "x1")) -> None:
    """Check two batches that are to be coupled: same per-sample shape, device and dtype."""
    check_batch(x0, names[0])
    check_batch(x1, names[1])
    if x0.shape[1:] != x1.shape[1:]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same per-sample shape, "
                         f"got {tuple(x0.shape)} and {tuple(x1.shape)}")
    if same_batch_size and x0.shape[0] != x1.shape[0]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same batch size here, "
                         f"got {x0.shape[0]} and {x1.shape[0]}")
    if x0.device != x1.device:
        raise ValueError(f"{names[0]} is on {x0.device} but {names[1]} is on {x1.device}; expected one device")
    if x0.dtype != x1.dtype:
        raise ValueError(f"{names[0]} has dtype {x0.dtype} but {names[1]} has {x1.dtype}; expected one dtype")


def check_labels(y, n: int, name: str = "y", *, num_classes: int | None = None) -> torch.Tensor:
    """Check class labels: an integer tensor of shape (n,), one per sample, >= 0 and < num_classes (when given)."""
    if not isinstance(y, torch.Tensor) or y.shape != (n,) or y.is_floating_point() or y.is_complex() \
            or y.dtype == torch.bool:
        got = f"shape {tuple(y.shape)} and dtype {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{name} must be an integer tensor of shape ({n},), one class label per sample, got {got}")
    if y.numel() and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        raise ValueError(f"{name} span [{int(y.min())}, {int(y.max())}]; expected classes in "
                         f"0..{'K-1' if num_classes is None else num_classes - 1}")
    return y


def as_time_tensor(t: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Turn a float, a one-element tensor (ODE solvers pass t as shape () or (1,)) or a (B,) tensor
    into a (B,) tensor on ``like``'s device and dtype."""
    batch = like.shape[0]
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.numel() == 1 and t.ndim <= 1:
        return t.reshape(()).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a float or a tensor of shape ({batch},), got shape {tuple(t.shape)}")
    return t


def check_time(t: float | torch.Tensor, like: torch.Tensor, *, low: float = 0.0, high: float = 1.0,
               include_low: bool = True, include_high: bool = True) -> torch.Tensor:
    """Validate times against an interval (closed by default) and return them as a (B,) tensor."""
    t = as_time_tensor(t, like)
    if not torch.isfinite(t).all():
        raise ValueError("t contains NaN or inf; expected times in "
                         f"{'[' if include_low else '('}{low}, {high}{']' if include_high else ')'}")
    below = (t < low) if include_low else (t <= low)
    above = (t > high) if include_high else (t >= high)
    if (below | above).any():
        bad = t[below | above][:5].tolist()
        raise ValueError(f"t must lie in {'[' if include_low else '('}{low}, {high}{']' if include_high else ')'}, "
                         f"got values {bad}")
    return t


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to (B, 1, ..., 1) so that it broadcasts against x of shape (B, *shape)."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def check_images(images: torch.Tensor, name: str, shape: tuple | None = None) -> None:
    """ValueError unless ``images`` is a non-empty finite float batch (N, C, H, W), of ``shape`` per image when given."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        desc = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: {desc}; expected a non-empty batch of images (N, C, H, W)")
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise ValueError(f"{name}: expected finite floating-point images (dtype {images.dtype})")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"{name}: images of shape {tuple(images.shape[1:])}; the classifier expects {tuple(shape)}")


def check_int64_labels(labels: torch.Tensor, n: int, num_classes: int | None, name: str) -> None:
    """``check_labels``, and int64 (the classifier's loss and comparisons take int64 class indices)."""
    check_labels(labels, n, name, num_classes=num_classes)
    if labels.dtype != torch.int64:
        raise ValueError(f"{name} has dtype {labels.dtype}; expected int64 class indices (labels.long())")


def check_class_array(labels: np.ndarray, n: int, name: str, *, per: str = "sample") -> np.ndarray:
    """Class labels read from a file -> int64 (n,): one per ``per``, integers (floats with integer values
    pass) in 0..MAX_CLASSES - 1. ``name`` (the file and the labels' key) starts every message."""
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} of shape {labels.shape}; expected one per {per}, shape ({n},)")
    if np.issubdtype(labels.dtype, np.floating):
        if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
            raise ValueError(f"{name} are not integers; expected class indices 0, 1, ...")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} of dtype {labels.dtype}; expected integers")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} include {labels.min()}; expected class indices >= 0")
    top = labels.max() if labels.size else 0
    if top >= MAX_CLASSES:
        shown = int(top) if top < 2**63 else float(top)
        raise ValueError(f"{name} include {shown}; expected class indices below MAX_CLASSES = {MAX_CLASSES} (label k "
                         "means k + 1 classes, and a conditional model holds one embedding row per class)")
    return labels.astype(np.int64)


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int, or ValueError unless it is an integer in [0, MAX_SEED] (bools are refused)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2**63 - 1], got {seed!r}")
    return int(seed)
