"""Fréchet distances between feature sets, and FID in the features of InceptionV3 (RGB data).

Fréchet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a
local Nash equilibrium") between Gaussians fitted to two feature sets:

    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})

``inception_fid`` computes the usual FID in the 2048-d pool features of torch-fidelity's InceptionV3, and only
from a weights file the user gives; without one it is skipped with a message saying how to enable it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ot_cfm.utils.validation import check_images

__all__ = ["frechet_distance", "frechet_distance_from_moments", "InceptionFID", "inception_fid"]


# ---------------------------------------------------------------- Fréchet distance

def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix by eigendecomposition.

    The matrix is symmetrised first, and eigenvalues below 0 (round-off on singular or nearly singular
    covariances, e.g. fewer samples than dimensions) are clamped to 0 before the square root.
    """
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0.0).sqrt()) @ vectors.T


def frechet_distance_from_moments(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor,
                                  cov_b: torch.Tensor) -> float:
    """Fréchet distance between N(mean_a, cov_a) and N(mean_b, cov_b): means (D,), covariances (D, D).

    Computed in float64 on the inputs' device. The cross term is tr((A S_b A)^{1/2}) with A = S_a^{1/2}:
    both square roots are of symmetric PSD matrices, taken by eigendecomposition with eigenvalues
    clamped at 0, so no complex parts appear (scipy's ``sqrtm`` of the non-symmetric S_a S_b can return
    them). The result, a squared distance, is clamped at 0 (identical inputs give 0 up to round-off).
    """
    d = mean_a.shape[0] if mean_a.ndim == 1 else -1
    for name, t, shape in (("mean_a", mean_a, (d,)), ("cov_a", cov_a, (d, d)), ("mean_b", mean_b, (d,)),
                           ("cov_b", cov_b, (d, d))):
        if tuple(t.shape) != shape or d < 1:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected means (D,) and covariances (D, D) "
                             f"with one D (mean_a gives D = {d})")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf; expected finite moments")
    device = mean_a.device
    mean_a, cov_a, mean_b, cov_b = (t.detach().to(device=device, dtype=torch.float64)
                                    for t in (mean_a, cov_a, mean_b, cov_b))
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(_sym(root_a @ cov_b @ root_a)).clamp_min(0.0).sqrt().sum()
    value = (mean_a - mean_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2.0 * cross
    return max(float(value), 0.0)


def _sym(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.T) / 2


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of x (N, D), in float64."""
    x = x.detach().to(torch.float64)
    centred = x - x.mean(0)
    return x.mean(0), centred.T @ centred / (x.shape[0] - 1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (Na, D) and b (Nb, D).

    Fits means and unbiased covariances (divided by N - 1, as ``numpy.cov`` and the reference FID
    code do) in float64 and returns ``frechet_distance_from_moments`` of them: 0 (to round-off) for
    identical sets, symmetric in a and b. Needs at least 2 rows in each set; both on one device.
    """
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] < 2 or not x.is_floating_point():
            desc = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: {desc}; expected a floating feature matrix (N, D) with N >= 2")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf; expected finite features")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a has {a.shape[1]} features per row and b has {b.shape[1]}; expected the same D")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}; expected one device")
    return frechet_distance_from_moments(*_moments(a), *_moments(b))




# ---------------------------------------------------------------- FID with Inception features (RGB data)

#: a few entries of InceptionV3's FID state dict (torch-fidelity's key names) and their shapes, checked
#: before the weights are used, so that another file fails with a clear error
_INCEPTION_KEYS = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
                   "fc.weight": (1008, 2048)}
_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
_HOW_TO_ENABLE = (f"to compute FID, download torch-fidelity's InceptionV3 weights ({_INCEPTION_FILE}, from the "
                  "torch-fidelity v0.2.0 release on GitHub) yourself and pass its path as inception_weights "
                  "(--inception-weights PATH on the command line); this needs torch-fidelity "
                  "(pip install torch-fidelity) and a torchvision that loads with your torch")


@dataclass(frozen=True)
class InceptionFID:
    """FID in InceptionV3's 2048-d pool features, or why it was skipped.

    value: the FID, None when skipped; message: how it was computed, or why it was skipped and how to
    enable it.
    """

    value: float | None
    message: str
    num_generated: int
    num_reference: int

    @property
    def skipped(self) -> bool:
        return self.value is None


def _read_inception_state(path: Path) -> dict:
    """The InceptionV3 state dict in ``path``, read with ``torch.load(weights_only=True)`` and checked."""
    expected = f"an InceptionV3 FID state dict of tensors ({_INCEPTION_FILE} from torch-fidelity)"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected {expected}. Nothing is downloaded")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors of many kinds; all mean the same to the user
        raise ValueError(f"{path}: not readable by torch.load(weights_only=True) ({type(e).__name__}: {e}); "
                         f"expected {expected}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a dict of tensors; expected {expected}")
    for key, shape in _INCEPTION_KEYS.items():
        found = tuple(state[key].shape) if key in state else None
        if found != shape:
            raise ValueError(f"{path}: entry {key!r} " + ("is missing" if found is None else f"has shape {found}")
                             + f"; expected shape {shape} in {expected}")
    return state


def _inception_extractor(path: Path, device: torch.device) -> nn.Module:
    state = _read_inception_state(path)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as e:  # ImportError, or torchvision's RuntimeError when it does not match torch
        raise ImportError(f"FID with Inception features uses torch-fidelity's InceptionV3, and importing it failed "
                          f"({type(e).__name__}: {e}); install torch-fidelity (pip install torch-fidelity) with a "
                          "torchvision that loads with your torch (torch-fidelity imports torchvision)") from e
    # torch-fidelity reads its weights file with torch.load(weights_only=False); hand it a private copy
    # written from the tensors that weights_only=True already read, never the user's file itself
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / _INCEPTION_FILE
        torch.save(state, copy)
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(copy))
    return extractor.to(device).eval()


def _to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, 1 or 3, H, W) -> uint8 RGB (N, 3, H, W), as the reference FID code reads PNGs."""
    x = images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def inception_fid(generated: torch.Tensor, reference: torch.Tensor, *,
                  inception_weights: str | os.PathLike | None = None, batch_size: int = 200,
                  device: torch.device | str | None = None) -> InceptionFID:
    """FID of generated (N, C, H, W) against reference (M, C, H, W) images in [-1, 1], C in {1, 3}.

    Without ``inception_weights`` nothing is computed (or downloaded): the result has value None and a
    message saying how to enable it. With it, the file must be InceptionV3's FID weights as a state
    dict (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``); it is read with
    ``torch.load(weights_only=True)``, checked, and loaded into torch-fidelity's InceptionV3. Images
    are quantised to uint8 (grey ones repeated to RGB), resized to 299x299 by torch-fidelity as
    TensorFlow's FID does, and the Fréchet distance of the 2048-d pool features is computed by
    ``frechet_distance`` (float64). Runs on ``device`` (default: the generated images' device).
    Raises FileNotFoundError / ValueError for a missing or wrong file, ImportError when torch-fidelity
    cannot be imported.
    """
    for name, images in (("generated", generated), ("reference", reference)):
        check_images(images, name)
        if images.shape[1] not in (1, 3) or images.shape[0] < 2:
            raise ValueError(f"{name}: shape {tuple(images.shape)}; expected at least 2 images with 1 or 3 channels")
    n, m = generated.shape[0], reference.shape[0]
    if inception_weights is None:
        return InceptionFID(None, f"FID skipped: no Inception weights given; {_HOW_TO_ENABLE}", n, m)
    device = torch.device(device) if device is not None else generated.device
    extractor = _inception_extractor(Path(inception_weights), device)
    features = [torch.cat([extractor(_to_uint8_rgb(chunk.to(device)))[0] for chunk in images.split(batch_size)])
                for images in (generated, reference)]
    return InceptionFID(frechet_distance(*features),
                        f"FID in InceptionV3 pool features (torch-fidelity) from {inception_weights}", n, m)
