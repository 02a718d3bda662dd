"""Image metrics: the Fréchet distance against closed forms, the cached classifier, coverage and
conditional accuracy on real digits, and the Inception FID's loading path."""

import fractions
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from ot_cfm.images import (
    ClassifierConfig,
    classifier_accuracy,
    classifier_cache_path,
    evaluate_images,
    frechet,
    frechet_distance,
    frechet_distance_from_moments,
    inception_fid,
    load_image_dataset,
    load_or_train_classifier,
    memorisation,
    train_classifier,
)
from ot_cfm.images import classifier as classifier_module

FAST = ClassifierConfig(steps=400)


def _gaussian(n, d, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing) * scale + shift


# ---------------------------------------------------------------- Fréchet distance

def test_frechet_distance_is_zero_for_identical_sets():
    a = _gaussian(500, 16, 0, scale=3.0, shift=5.0)
    assert frechet_distance(a, a.clone()) < 1e-9 * float(a.var(0).sum())
    # fewer samples than dimensions: singular covariances, still 0 (eigenvalues clamped, no NaN)
    few = _gaussian(10, 32, 1)
    assert frechet_distance(few, few) < 1e-9


def test_frechet_distance_is_symmetric():
    a, b = _gaussian(400, 12, 0), _gaussian(300, 12, 1, scale=2.0, shift=0.5)
    ab, ba = frechet_distance(a, b), frechet_distance(b, a)
    assert ab > 1.0
    assert ab == pytest.approx(ba, rel=1e-10)


def test_frechet_distance_grows_with_added_noise():
    a = _gaussian(2000, 10, 0)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    values = [frechet_distance(a, a + sigma * noise) for sigma in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert values[0] < 1e-9
    assert all(later > earlier for earlier, later in zip(values, values[1:])), values
    # independent noise adds sigma^2 I to the covariance: FD = sum_i (sqrt(l_i + sigma^2) - sqrt(l_i))^2 over the
    # eigenvalues l_i of a's covariance, up to the sample cross-covariance of a and the noise
    eigenvalues = torch.linalg.eigvalsh(torch.cov(a.T))
    expected = float(((eigenvalues + 9.0).sqrt() - eigenvalues.sqrt()).square().sum())
    assert values[-1] == pytest.approx(expected, rel=0.05)


def test_frechet_distance_of_a_translation_is_the_squared_shift():
    a = _gaussian(300, 6, 2).float()  # float32 input is computed in float64
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 0.25])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-5)


def test_frechet_distance_from_moments_matches_the_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    s_a, s_b = torch.rand(8, generator=g, dtype=torch.float64) * 4, torch.rand(8, generator=g, dtype=torch.float64)
    mu_a, mu_b = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    expected = float((s_a.sqrt() - s_b.sqrt()).square().sum() + (mu_a - mu_b).square().sum())
    assert frechet_distance_from_moments(mu_a, torch.diag(s_a), mu_b, torch.diag(s_b)) == pytest.approx(expected,
                                                                                                          rel=1e-12)


@pytest.mark.parametrize("rank_b", [12, 4])  # full rank, and a singular covariance
def test_frechet_distance_from_moments_matches_scipy_sqrtm(rank_b):
    g = torch.Generator().manual_seed(rank_b)
    x, y = torch.randn(12, 12, generator=g, dtype=torch.float64), torch.randn(12, rank_b, generator=g,
                                                                               dtype=torch.float64)
    cov_a, cov_b = x @ x.T / 12, y @ y.T / 12
    mu_a, mu_b = torch.randn(12, generator=g, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    cross = scipy.linalg.sqrtm(cov_a.numpy() @ cov_b.numpy())  # the reference FID code's formula
    expected = float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace()) - 2 * float(np.trace(cross).real)
    assert frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-8, abs=1e-8)


def test_frechet_distance_rejects_bad_inputs():
    a = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"a has 3 features per row and b has 4"):
        frechet_distance(a, torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"b: shape \(1, 3\).*N >= 2"):
        frechet_distance(a, torch.randn(1, 3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(a, torch.full((5, 3), float("nan")))
    with pytest.raises(ValueError, match=r"cov_b has shape \(3,\)"):
        frechet_distance_from_moments(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.ones(3))


# ---------------------------------------------------------------- the classifier and its cache

@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits")


@pytest.fixture(scope="module")
def classifier(digits, tmp_path_factory):
    return load_or_train_classifier(digits.train_images, digits.train_labels, num_classes=10, config=FAST,
                                    cache_dir=tmp_path_factory.mktemp("classifiers"))


def test_classifier_is_accurate_on_held_out_digits(classifier, digits):
    assert classifier_accuracy(classifier, digits.held_out_images, digits.held_out_labels) > 0.96


def test_training_is_a_function_of_data_and_seed(digits):
    images, labels = digits.train_images[:300], digits.train_labels[:300]
    config = ClassifierConfig(steps=20, seed=3)
    a, b = (train_classifier(images, labels, num_classes=10, config=config) for _ in range(2))
    c = train_classifier(images, labels, num_classes=10, config=ClassifierConfig(steps=20, seed=4))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.head.weight, c.head.weight)


def test_classifier_cache_loads_instead_of_training_and_retrains_a_corrupt_file(digits, tmp_path, monkeypatch):
    images, labels = digits.train_images[:200], digits.train_labels[:200]
    config = ClassifierConfig(steps=10)
    calls = []
    real_train = classifier_module.train_classifier
    monkeypatch.setattr(classifier_module, "train_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    monkeypatch.setenv(classifier_module.CLASSIFIER_CACHE_ENV, str(tmp_path))  # the environment picks the folder

    first = load_or_train_classifier(images, labels, num_classes=10, config=config)
    path = classifier_cache_path(images, labels, num_classes=10, config=config)
    assert calls == [1] and path.parent == tmp_path and path.is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good cache file loads silently
        second = load_or_train_classifier(images, labels, num_classes=10, config=config)
    assert calls == [1]
    assert torch.equal(first.predict(images), second.predict(images))
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())

    # other data or settings never load this file
    assert classifier_cache_path(images, labels, num_classes=10, config=ClassifierConfig(steps=11)) != path
    assert classifier_cache_path(images, labels.roll(1), num_classes=10, config=config) != path

    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.warns(RuntimeWarning, match="unreadable or does not match.*retraining"):
        third = load_or_train_classifier(images, labels, num_classes=10, config=config)
    assert calls == [1, 1]
    assert all(torch.equal(v, third.state_dict()[k]) for k, v in first.state_dict().items())  # same seed, same net
    assert load_or_train_classifier(images, labels, num_classes=10, config=config) is not None and calls == [1, 1]


def test_classifier_rejects_mismatched_images(classifier):
    with pytest.raises(ValueError, match=r"images of shape \(1, 28, 28\); the classifier expects \(1, 8, 8\)"):
        classifier_accuracy(classifier, torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"must be an integer tensor of shape \(4,\), one class label per sample"):
        classifier_accuracy(classifier, torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expected int64 class indices"):
        classifier_accuracy(classifier, torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int32))


# ---------------------------------------------------------------- evaluate_images on real digits

def test_held_out_digits_score_well(classifier, digits):
    held, labels = digits.held_out_images, digits.held_out_labels
    same = evaluate_images(held, digits.train_images, classifier)
    noise = torch.randn(held.shape, generator=torch.Generator().manual_seed(0))
    noisy = evaluate_images((held + 0.5 * noise).clamp(-1, 1), digits.train_images, classifier)
    assert same.frechet_distance < noisy.frechet_distance / 5
    assert same.coverage_entropy > 0.98 and same.least_frequent_share > 0.06  # uniform: 1.0 and 0.1
    assert sum(same.class_counts) == held.shape[0] and same.conditional_accuracy is None

    cond = evaluate_images(held, held, classifier, requested_labels=labels)
    assert cond.frechet_distance < 1e-6 and cond.conditional_accuracy > 0.96
    shuffled = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(1))]
    assert evaluate_images(held, held, classifier, requested_labels=shuffled).conditional_accuracy < 0.25


def test_a_single_class_gives_concentrated_coverage(classifier, digits):
    sevens = digits.held_out_images[digits.held_out_labels == 7]
    quality = evaluate_images(sevens, digits.held_out_images, classifier)
    assert quality.least_frequent_share == 0.0
    assert quality.class_counts[7] >= 0.95 * sevens.shape[0]
    assert quality.coverage_entropy < 0.1
    everything = evaluate_images(digits.held_out_images, digits.held_out_images, classifier)
    assert quality.frechet_distance > 10 * everything.frechet_distance + 1.0


def test_evaluate_images_rejects_bad_requested_labels(classifier, digits):
    held = digits.held_out_images[:10]
    with pytest.raises(ValueError, match=r"requested_labels span \[1, 10\]; expected classes in 0..9"):
        evaluate_images(held, held, classifier, requested_labels=torch.arange(1, 11))


# ---------------------------------------------------------------- FID with Inception features

def test_inception_fid_is_skipped_without_weights():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    result = inception_fid(x, x)
    assert result.skipped and result.value is None
    assert "inception_weights" in result.message and "--inception-weights" in result.message


def test_inception_weights_file_errors(tmp_path, monkeypatch):
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with pytest.raises(FileNotFoundError, match="missing.pth: no such file; expected an InceptionV3"):
        inception_fid(x, x, inception_weights=tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "fc.weight": torch.zeros(10, 2048)}, wrong)
    with pytest.raises(ValueError, match=r"'Mixed_7c.branch_pool.conv.weight' is missing"):
        inception_fid(x, x, inception_weights=wrong)
    pickled = tmp_path / "object.pth"
    torch.save({"fc.weight": torch.zeros(1), "ratio": fractions.Fraction(1, 3)}, pickled)
    with pytest.raises(ValueError, match=r"not readable by torch.load\(weights_only=True\)"):
        inception_fid(x, x, inception_weights=pickled)
    # the right entries, but torch-fidelity cannot be imported: an ImportError saying what to install
    right = tmp_path / "right.pth"
    torch.save({k: torch.zeros(s) for k, s in frechet._INCEPTION_KEYS.items()}, right)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        inception_fid(x, x, inception_weights=right)


def test_inception_fid_with_weights_the_test_creates(tmp_path, monkeypatch):
    """Runs where torch-fidelity (and a torchvision matching torch) can be imported."""
    try:  # a torchvision built for another torch raises RuntimeError on import, not ImportError
        import torch_fidelity.feature_extractor_inceptionv3 as inception
    except Exception as e:
        pytest.skip(f"torch-fidelity's InceptionV3 cannot be imported here ({type(e).__name__}: {e})")
    extractor_class = inception.FeatureExtractorInceptionV3
    with monkeypatch.context() as patch:  # build the network without weights, to save randomly initialised ones
        patch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(extractor_class, "load_state_dict", lambda self, state, strict=True: None)
        random_net = extractor_class("test", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(random_net.state_dict(), weights)
    loaded = frechet._inception_extractor(weights, torch.device("cpu"))
    assert loaded.features_list == ["2048"]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in random_net.state_dict().items())
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1, torch.rand(6, 1, 32, 32, generator=g) * 2 - 1
    same = inception_fid(a, a, inception_weights=weights)
    ab, ba = inception_fid(a, b, inception_weights=weights), inception_fid(b, a, inception_weights=weights)
    assert not same.skipped and same.value == 0.0
    assert ab.value > 0 and ab.value == pytest.approx(ba.value, rel=1e-6)


# ---------------------------------------------------------------- memorisation distances

def _brute_force_nearest(samples, train, exclude=None):
    """One Python loop per sample over every training image, distances from the differences in float64."""
    x, y = samples.flatten(1).double(), train.flatten(1).double()
    distance, index = [], []
    for i in range(x.shape[0]):
        d = [float((x[i] - y[j]).norm()) if j != (None if exclude is None else exclude[i]) else float("inf")
             for j in range(y.shape[0])]
        index.append(int(np.argmin(d)))
        distance.append(d[index[-1]])
    return torch.tensor(distance, dtype=torch.float64), torch.tensor(index)


@pytest.mark.parametrize("chunk_size", [1, 7, 256])
def test_memorisation_distances_match_a_brute_force_loop(chunk_size):
    g = torch.Generator().manual_seed(0)
    train = torch.rand(60, 1, 4, 4, generator=g) * 2 - 1
    samples = torch.cat([torch.rand(25, 1, 4, 4, generator=g) * 2 - 1,
                         train[[3, 17]] + 0.01 * torch.randn(2, 1, 4, 4, generator=g)])
    result = memorisation.memorisation_distances(samples, train, chunk_size=chunk_size)
    distance, index = _brute_force_nearest(samples, train)
    assert torch.equal(result.index, index)
    torch.testing.assert_close(result.distance, distance, rtol=1e-12, atol=1e-12)
    assert result.index[-2:].tolist() == [3, 17]
    neighbour, _ = _brute_force_nearest(train[index], train, exclude=index.tolist())
    torch.testing.assert_close(result.neighbour_distance, neighbour, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.ratio, distance / neighbour, rtol=1e-12, atol=0.0)
    assert result.ratio[-2:].max() < 0.1 < result.ratio[:-2].min()
    assert result.distance.dtype == result.ratio.dtype == torch.float64 and result.index.dtype == torch.int64


def test_copies_of_training_images_have_distance_and_ratio_zero_even_far_from_the_origin():
    """Far from the origin |a|^2 + |b|^2 - 2ab cancels: float64 on values ~1e4 leaves an error ~1e-8 in the
    squared distance, i.e. ~1e-4 in the distance. The returned distances come from the differences.
    Two clusters at -1e4 and +1e4, so that centring on the training mean does not remove the offset."""
    g = torch.Generator().manual_seed(1)
    sign = torch.arange(40, dtype=torch.float64).remainder(2).mul(2).sub(1).view(40, 1, 1)
    train = (1e4 * sign + torch.rand(40, 8, 8, generator=g, dtype=torch.float64)).unsqueeze(1)
    samples = torch.cat([train[[5, 0, 39]], train[[9]] + 1e-7])
    result = memorisation.memorisation_distances(samples, train, chunk_size=3)
    assert result.index.tolist() == [5, 0, 39, 9]
    assert result.distance[:3].tolist() == [0.0, 0.0, 0.0] and result.ratio[:3].tolist() == [0.0, 0.0, 0.0]
    assert float(result.distance[3]) == pytest.approx(float((samples[3] - train[9]).norm()), rel=1e-12)  # ~8e-7
    torch.testing.assert_close(result.neighbour_distance, _brute_force_nearest(train[result.index], train,
                                                                                exclude=result.index.tolist())[0])


def test_duplicated_training_images_give_ratio_zero_for_copies_and_inf_otherwise():
    train = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    result = memorisation.memorisation_distances(torch.tensor([[0.0, 0.0], [0.6, 0.8], [3.0, 4.0]]), train)
    assert result.distance.tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert result.neighbour_distance.tolist() == pytest.approx([0.0, 0.0, 5.0])
    assert result.ratio.tolist() == [0.0, float("inf"), 0.0]


def test_memorisation_distances_reject_bad_inputs():
    train = torch.zeros(5, 1, 8, 8)
    with pytest.raises(ValueError, match=r"per-sample shape \(1, 4, 4\) and train \(1, 8, 8\)"):
        memorisation.memorisation_distances(torch.zeros(2, 1, 4, 4), train)
    with pytest.raises(ValueError, match="train holds 1 image; expected at least 2"):
        memorisation.memorisation_distances(torch.zeros(2, 1, 8, 8), train[:1])
    with pytest.raises(ValueError, match="samples contains NaN"):
        memorisation.memorisation_distances(torch.full((2, 1, 8, 8), float("nan")), train)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        memorisation.memorisation_distances(train, train, chunk_size=0)
