"""Images: datasets read from local files, the metrics of generated images, and sampling and scoring image models.

- ``datasets``: ``load_image_dataset`` (digits, MNIST, CIFAR-10, array files, class folders) and ``ImageDataset``.
- ``readers``, ``cifar``: the file readers (IDX, numpy arrays, image folders; CIFAR-10 batches, unpickled safely).
- ``classifier``: the package's own feature classifier for digits and MNIST, trained once and cached.
- ``frechet``: Fréchet distances, and FID in InceptionV3's features from a weights file the user gives.
- ``quality``: ``evaluate_images`` (Fréchet distance, mode coverage, conditional accuracy).
- ``memorisation``: distances from generated images to their nearest training images.
- ``sampling``: chunked (guided) sampling, sample grids on fixed noise, the metrics at each solver setting.

Images are (N, C, H, W) in [-1, 1] with labels (N,) int64.
"""

from ot_cfm.images.cifar import CIFAR10_CLASSES, read_cifar10, read_cifar_batch
from ot_cfm.images.classifier import (
    CLASSIFIER_CACHE_ENV,
    ClassifierConfig,
    ImageClassifier,
    classifier_accuracy,
    classifier_cache_path,
    load_or_train_classifier,
    train_classifier,
)
from ot_cfm.images.datasets import IMAGE_DATASETS, ImageDataset, load_image_dataset
from ot_cfm.images.frechet import InceptionFID, frechet_distance, frechet_distance_from_moments, inception_fid
from ot_cfm.images.memorisation import MemorisationDistances, memorisation_distances
from ot_cfm.images.quality import ImageQuality, evaluate_images
from ot_cfm.images.readers import IMAGE_EXTENSIONS, read_array_file, read_idx, read_image_folder, read_mnist

__all__ = [
    "IMAGE_DATASETS", "CIFAR10_CLASSES", "IMAGE_EXTENSIONS", "ImageDataset", "load_image_dataset",
    "read_idx", "read_mnist", "read_cifar_batch", "read_cifar10", "read_array_file", "read_image_folder",
    "frechet_distance", "frechet_distance_from_moments", "ClassifierConfig", "ImageClassifier",
    "load_or_train_classifier", "train_classifier", "classifier_cache_path", "classifier_accuracy",
    "ImageQuality", "evaluate_images", "InceptionFID", "inception_fid", "CLASSIFIER_CACHE_ENV",
    "MemorisationDistances", "memorisation_distances",
]
