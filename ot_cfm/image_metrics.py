"""Quality of generated images, with nothing downloaded: Fréchet distances, mode coverage, conditional accuracy.

Fréchet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a
local Nash equilibrium") between Gaussians fitted to two feature sets:

    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})

For digits and MNIST the features are the penultimate activations of a small CNN that the package
trains itself on the training split (``load_or_train_classifier``; cached on disk by a content hash
of the training data and the settings). The same classifier labels the generated images: its label
histogram measures mode coverage, and on class-conditional samples its accuracy says whether each
sample shows the class it was asked for (``evaluate_images``). For CIFAR-10 and other RGB data,
``inception_fid`` computes the usual FID in the 2048-d pool features of torch-fidelity's
InceptionV3, and only from a weights file the user gives; without one it is skipped with a message
saying how to enable it. ``memorisation_distances`` says how close each generated image is to a
training image, relative to how close the training images are to each other.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ot_cfm.atomic import atomic_write
from ot_cfm.validation import check_batch, check_labels

__all__ = [
    "frechet_distance", "frechet_distance_from_moments", "ClassifierConfig", "ImageClassifier",
    "load_or_train_classifier", "train_classifier", "classifier_cache_path", "classifier_accuracy",
    "ImageQuality", "evaluate_images", "InceptionFID", "inception_fid", "CLASSIFIER_CACHE_ENV",
    "MemorisationDistances", "memorisation_distances",
]

#: environment variable naming the folder of cached classifiers (default ``~/.cache/ot-cfm/classifiers``)
CLASSIFIER_CACHE_ENV = "OT_CFM_CLASSIFIER_CACHE"
_CACHE_FORMAT = 1  # bump when the architecture or the file layout changes: old files then miss the cache


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


# ---------------------------------------------------------------- the package's own classifier

@dataclass(frozen=True)
class ClassifierConfig:
    """Settings of the feature classifier; all of them enter the cache key.

    width: channels of the first convolution (the second has twice as many); features: size of the
    penultimate layer, the feature space of the Fréchet distance; steps of Adam on minibatches of
    ``batch_size`` drawn (with reshuffling each epoch) from ``seed``, which also draws the initial weights.
    """

    width: int = 32
    features: int = 64
    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self):
        for name in ("width", "features", "steps", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.learning_rate > 0 or not self.weight_decay >= 0:
            raise ValueError(f"learning_rate must be > 0 and weight_decay >= 0, got {self.learning_rate} and "
                             f"{self.weight_decay}")


class ImageClassifier(nn.Module):
    """A small CNN for images (N, C, H, W) in [-1, 1]:

        conv3x3(C -> w) ReLU maxpool2, conv3x3(w -> 2w) ReLU maxpool2, adaptive avgpool to 2x2,
        linear(8w -> features) ReLU   [the features],   linear(features -> num_classes)   [the logits]

    ``features(x)`` returns the penultimate activations (N, features); ``forward(x)`` the logits.
    Works for any H, W >= 4 (8x8 digits, 28x28 MNIST, 32x32 CIFAR-10).
    """

    def __init__(self, shape: tuple[int, int, int], num_classes: int, config: ClassifierConfig = ClassifierConfig(),
                 *, device: torch.device | str | None = None):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or shape[0] < 1 or min(shape[1:]) < 4:
            raise ValueError(f"shape must be (C, H, W) with H, W >= 4, got {shape}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.shape, self.num_classes, self.config = shape, int(num_classes), config
        w = config.width
        # built on the meta device, so construction draws nothing from torch's global generator;
        # ``_initialise`` then draws the weights from an explicit generator
        self.body = nn.Sequential(
            nn.Conv2d(shape[0], w, 3, padding=1, device="meta"), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, device="meta"), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * w, config.features, device="meta"), nn.ReLU())
        self.head = nn.Linear(config.features, num_classes, device="meta")
        self.to_empty(device=device or "cpu")
        self._initialise(torch.Generator().manual_seed(config.seed))

    @torch.no_grad()
    def _initialise(self, generator: torch.Generator) -> None:
        """PyTorch's default initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases,
        drawn on the CPU from ``generator`` (so the weights do not depend on the device)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                for p in (module.weight, module.bias):
                    p.copy_(torch.rand(p.shape, generator=generator, dtype=p.dtype).mul_(2 * bound).sub_(bound))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
        """Predicted class (N,) int64 of images x (N, C, H, W)."""
        return torch.cat([self(chunk).argmax(1) for chunk in x.split(batch_size)])


def _check_images(images: torch.Tensor, name: str, shape: tuple | None = None) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        desc = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: {desc}; expected a non-empty batch of images (N, C, H, W)")
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise ValueError(f"{name}: expected finite floating-point images (dtype {images.dtype})")
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"{name}: images of shape {tuple(images.shape[1:])}; the classifier expects {tuple(shape)}")


def _check_labels(labels: torch.Tensor, n: int, num_classes: int | None, name: str) -> None:
    """``check_labels``, and int64 (the classifier's loss and comparisons take int64 class indices)."""
    check_labels(labels, n, name, num_classes=num_classes)
    if labels.dtype != torch.int64:
        raise ValueError(f"{name} has dtype {labels.dtype}; expected int64 class indices (labels.long())")


def _check_training_data(images: torch.Tensor, labels: torch.Tensor, num_classes: int | None) -> int:
    """Check training images and labels; return the number of classes (default: the largest label + 1)."""
    _check_images(images, "images")
    _check_labels(labels, images.shape[0], num_classes, "labels")
    return int(labels.max()) + 1 if num_classes is None else int(num_classes)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None,
                     config: ClassifierConfig = ClassifierConfig()) -> ImageClassifier:
    """Train an ``ImageClassifier`` on images (N, C, H, W) in [-1, 1] and labels (N,), on the images' device.

    Cross-entropy, Adam with ``config``'s learning rate and weight decay, ``config.steps`` minibatches
    taken in order from one permutation per epoch; initial weights and permutations come from
    ``config.seed`` only, so the result is a function of the data and the config. Returned in eval mode.
    """
    num_classes = _check_training_data(images, labels, num_classes)
    model = ImageClassifier(tuple(images.shape[1:]), num_classes, config, device=images.device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed + 1)
    n, batch, order, position = images.shape[0], min(config.batch_size, images.shape[0]), None, 0
    model.train()
    for _ in range(config.steps):
        if order is None or position + batch > n:
            order, position = torch.randperm(n, generator=generator).to(images.device), 0
        index, position = order[position: position + batch], position + batch
        loss = nn.functional.cross_entropy(model(images[index]), labels[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model.eval().requires_grad_(False)


def _default_cache_dir() -> Path:
    if os.environ.get(CLASSIFIER_CACHE_ENV):
        return Path(os.environ[CLASSIFIER_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ot-cfm" / "classifiers"


def _cache_key(images: torch.Tensor, labels: torch.Tensor, num_classes: int, config: ClassifierConfig) -> str:
    digest = hashlib.sha256()
    header = {"format": _CACHE_FORMAT, "shape": list(images.shape), "num_classes": num_classes,
              "config": asdict(config)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(images.detach().to("cpu", torch.float32).contiguous().numpy())  # the buffer, not a copy
    digest.update(labels.detach().cpu().contiguous().numpy())
    return digest.hexdigest()


def classifier_cache_path(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None,
                          config: ClassifierConfig = ClassifierConfig(),
                          cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``load_or_train_classifier`` keeps the classifier of this training data and config:
    ``<cache_dir>/classifier-<first 24 hex digits of the SHA-256 of data and settings>.pt``."""
    num_classes = _check_training_data(images, labels, num_classes)
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return folder / f"classifier-{_cache_key(images, labels, num_classes, config)[:24]}.pt"


def load_or_train_classifier(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None,
                             config: ClassifierConfig = ClassifierConfig(),
                             cache_dir: str | os.PathLike | None = None) -> ImageClassifier:
    """The classifier of this training data and config: loaded from the cache, else trained and cached.

    The cache folder is ``cache_dir``, else the environment variable ``OT_CFM_CLASSIFIER_CACHE``, else
    ``$XDG_CACHE_HOME/ot-cfm/classifiers`` (``~/.cache/ot-cfm/classifiers``). The file's name is a
    content hash of the images, labels, number of classes and config (``classifier_cache_path``), so
    other data or settings never load it. The file is written atomically and read with
    ``torch.load(weights_only=True)``; one that is unreadable or does not match (truncated, corrupt,
    another version) is retrained and overwritten, with a warning naming it. Returned on the images'
    device, in eval mode.
    """
    num_classes = _check_training_data(images, labels, num_classes)
    path = classifier_cache_path(images, labels, num_classes=num_classes, config=config, cache_dir=cache_dir)
    key = path.stem.removeprefix("classifier-")
    if path.exists():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(stored, dict) or stored.get("key") != key or stored.get("format") != _CACHE_FORMAT:
                raise ValueError(f"expected a dict with format {_CACHE_FORMAT} and key {key}")
            model = ImageClassifier(tuple(images.shape[1:]), num_classes, config, device="cpu")
            model.load_state_dict(stored["state_dict"])
            return model.to(images.device).eval().requires_grad_(False)
        except Exception as e:  # a corrupt file fails in many ways (unpickling, EOF, shapes); each means retrain
            warnings.warn(f"cached classifier {path} is unreadable or does not match ({type(e).__name__}: {e}); "
                          "retraining it", RuntimeWarning, stacklevel=2)
    model = train_classifier(images, labels, num_classes=num_classes, config=config)
    payload = {"format": _CACHE_FORMAT, "key": key, "shape": list(images.shape[1:]), "num_classes": num_classes,
               "config": asdict(config), "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}
    atomic_write(path, lambda f: torch.save(payload, f), binary=True)
    return model


@torch.no_grad()
def classifier_accuracy(classifier: ImageClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images (N, C, H, W) whose predicted class equals labels (N,)."""
    _check_images(images, "images", classifier.shape)
    _check_labels(labels, images.shape[0], classifier.num_classes, "labels")
    return float((classifier.predict(images) == labels.to(images.device)).double().mean())


# ---------------------------------------------------------------- image quality

@dataclass(frozen=True)
class ImageQuality:
    """Quality of generated images as seen by the package's classifier.

    frechet_distance: Fréchet distance between the classifier's penultimate features of the generated
        and of the reference images (the reference should be held-out images, never training ones).
    class_counts: how many generated images the classifier assigns to each class (length K).
    coverage_entropy: entropy of the class shares divided by log K: 1 for a uniform histogram,
        0 when every image falls in one class.
    least_frequent_share: share of the generated images in the least frequent class (1/K when uniform,
        0 when some class is missing).
    conditional_accuracy: for class-conditional samples, the share classified as the class requested
        of them; None when no labels were requested.
    """

    frechet_distance: float
    class_counts: tuple[int, ...]
    coverage_entropy: float
    least_frequent_share: float
    conditional_accuracy: float | None
    num_generated: int
    num_reference: int

    @property
    def class_shares(self) -> tuple[float, ...]:
        return tuple(c / self.num_generated for c in self.class_counts)

    def as_dict(self) -> dict:
        out = {"frechet_distance": self.frechet_distance, "coverage_entropy": self.coverage_entropy,
               "least_frequent_share": self.least_frequent_share}
        if self.conditional_accuracy is not None:
            out["conditional_accuracy"] = self.conditional_accuracy
        return out


@torch.no_grad()
def _features_and_predictions(classifier: ImageClassifier, images: torch.Tensor, batch_size: int):
    features, predictions = [], []
    device = next(classifier.parameters()).device
    for chunk in images.split(batch_size):
        f = classifier.features(chunk.to(device=device, dtype=torch.float32))
        features.append(f)
        predictions.append(classifier.head(f).argmax(1))
    return torch.cat(features), torch.cat(predictions)


@torch.no_grad()
def evaluate_images(generated: torch.Tensor, reference: torch.Tensor, classifier: ImageClassifier, *,
                    requested_labels: torch.Tensor | None = None, batch_size: int = 1024) -> ImageQuality:
    """Fréchet distance, mode coverage and (for conditional samples) accuracy of generated images.

    generated (N, C, H, W) and reference (M, C, H, W), both in [-1, 1], with the classifier's image
    shape; requested_labels (N,) int64: the class each generated image was asked to show, or None.
    The images are moved to the classifier's device in chunks of ``batch_size``.
    """
    _check_images(generated, "generated", classifier.shape)
    _check_images(reference, "reference", classifier.shape)
    if generated.shape[0] < 2 or reference.shape[0] < 2:
        raise ValueError(f"got {generated.shape[0]} generated and {reference.shape[0]} reference images; the "
                         "Fréchet distance needs at least 2 of each")
    if requested_labels is not None:
        _check_labels(requested_labels, generated.shape[0], classifier.num_classes, "requested_labels")
    classifier.eval()
    gen_features, predicted = _features_and_predictions(classifier, generated, batch_size)
    ref_features, _ = _features_and_predictions(classifier, reference, batch_size)
    counts = torch.bincount(predicted, minlength=classifier.num_classes).cpu()
    shares = counts.double() / counts.sum()
    seen = shares[shares > 0]
    entropy = max(float(-(seen * seen.log()).sum()) / math.log(classifier.num_classes), 0.0)  # no -0.0
    accuracy = None
    if requested_labels is not None:
        accuracy = float((predicted == requested_labels.to(predicted.device)).double().mean())
    return ImageQuality(frechet_distance=frechet_distance(gen_features, ref_features),
                        class_counts=tuple(int(c) for c in counts), coverage_entropy=entropy,
                        least_frequent_share=float(shares.min()), conditional_accuracy=accuracy,
                        num_generated=generated.shape[0], num_reference=reference.shape[0])


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
        _check_images(images, name)
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
