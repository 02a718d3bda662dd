"""Quality of generated images in the feature classifier's features: Fréchet distance, mode coverage and
conditional accuracy (``evaluate_images``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ot_cfm.images.classifier import ImageClassifier
from ot_cfm.images.frechet import frechet_distance
from ot_cfm.utils.validation import check_images, check_int64_labels

__all__ = ["ImageQuality", "evaluate_images"]


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
    check_images(generated, "generated", classifier.shape)
    check_images(reference, "reference", classifier.shape)
    if generated.shape[0] < 2 or reference.shape[0] < 2:
        raise ValueError(f"got {generated.shape[0]} generated and {reference.shape[0]} reference images; the "
                         "Fréchet distance needs at least 2 of each")
    if requested_labels is not None:
        check_int64_labels(requested_labels, generated.shape[0], classifier.num_classes, "requested_labels")
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
