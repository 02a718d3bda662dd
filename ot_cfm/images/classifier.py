"""The package's own feature classifier for digits and MNIST: a small CNN trained on the training split.

Its penultimate activations are the features of the Fréchet distance (``ot_cfm.images.quality``), and its
predictions measure mode coverage and conditional accuracy. ``load_or_train_classifier`` caches it on disk
by a content hash of the training data and the settings (``CLASSIFIER_CACHE_ENV`` names the folder).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ot_cfm.utils.atomic import save_torch, torch_archive_problem
from ot_cfm.utils.validation import check_images, check_int64_labels

__all__ = ["ClassifierConfig", "ImageClassifier", "load_or_train_classifier", "train_classifier",
           "classifier_cache_path", "classifier_accuracy", "CLASSIFIER_CACHE_ENV"]


#: environment variable naming the folder of cached classifiers (default ``~/.cache/ot-cfm/classifiers``)
CLASSIFIER_CACHE_ENV = "OT_CFM_CLASSIFIER_CACHE"
_CACHE_FORMAT = 1  # bump when the architecture or the file layout changes: old files then miss the cache




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


def _check_training_data(images: torch.Tensor, labels: torch.Tensor, num_classes: int | None) -> int:
    """Check training images and labels; return the number of classes (default: the largest label + 1)."""
    check_images(images, "images")
    check_int64_labels(labels, images.shape[0], num_classes, "labels")
    return int(labels.max()) + 1 if num_classes is None else int(num_classes)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int | None = None,
                     config: ClassifierConfig = ClassifierConfig(), progress: bool = False) -> ImageClassifier:
    """Train an ``ImageClassifier`` on images (N, C, H, W) in [-1, 1] and labels (N,), on the images' device.

    Cross-entropy, Adam with ``config``'s learning rate and weight decay, ``config.steps`` minibatches
    taken in order from one permutation per epoch; initial weights and permutations come from
    ``config.seed`` only, so the result is a function of the data and the config. Returned in eval mode.
    ``progress`` shows a progress bar over the steps.
    """
    num_classes = _check_training_data(images, labels, num_classes)
    model = ImageClassifier(tuple(images.shape[1:]), num_classes, config, device=images.device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed + 1)
    n, batch, order, position = images.shape[0], min(config.batch_size, images.shape[0]), None, 0
    model.train()
    for _ in tqdm(range(config.steps), desc="feature classifier", unit=" step", disable=not progress,
                  dynamic_ncols=True):
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
                             cache_dir: str | os.PathLike | None = None, progress: bool = False) -> ImageClassifier:
    """The classifier of this training data and config: loaded from the cache, else trained (with a progress bar
    when ``progress``) and cached.

    The cache folder is ``cache_dir``, else the environment variable ``OT_CFM_CLASSIFIER_CACHE``, else
    ``$XDG_CACHE_HOME/ot-cfm/classifiers`` (``~/.cache/ot-cfm/classifiers``). The file's name is a
    content hash of the images, labels, number of classes and config (``classifier_cache_path``), so
    other data or settings never load it. The file is written atomically with a SHA-256 of its entries
    (``ot_cfm.utils.atomic.save_torch``), checked with it and read with ``torch.load(weights_only=True)``;
    one that is unreadable or does not match (truncated, damaged, another version) is retrained and
    overwritten, with a warning naming it. Returned on the images' device, in eval mode.
    """
    num_classes = _check_training_data(images, labels, num_classes)
    path = classifier_cache_path(images, labels, num_classes=num_classes, config=config, cache_dir=cache_dir)
    key = path.stem.removeprefix("classifier-")
    if path.exists():
        try:
            data = path.read_bytes()
            problem = torch_archive_problem(data)  # a flipped bit in the weights would still load
            if problem is not None:
                raise ValueError(problem)
            stored = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(stored, dict) or stored.get("key") != key or stored.get("format") != _CACHE_FORMAT:
                raise ValueError(f"expected a dict with format {_CACHE_FORMAT} and key {key}")
            model = ImageClassifier(tuple(images.shape[1:]), num_classes, config, device="cpu")
            model.load_state_dict(stored["state_dict"])
            return model.to(images.device).eval().requires_grad_(False)
        except Exception as e:  # a corrupt file fails in many ways (unpickling, EOF, shapes); each means retrain
            warnings.warn(f"cached classifier {path} is unreadable or does not match ({type(e).__name__}: {e}); "
                          "retraining it", RuntimeWarning, stacklevel=2)
    model = train_classifier(images, labels, num_classes=num_classes, config=config, progress=progress)
    payload = {"format": _CACHE_FORMAT, "key": key, "shape": list(images.shape[1:]), "num_classes": num_classes,
               "config": asdict(config), "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}
    save_torch(path, payload)
    return model


@torch.no_grad()
def classifier_accuracy(classifier: ImageClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images (N, C, H, W) whose predicted class equals labels (N,)."""
    check_images(images, "images", classifier.shape)
    check_int64_labels(labels, images.shape[0], classifier.num_classes, "labels")
    return float((classifier.predict(images) == labels.to(images.device)).double().mean())
