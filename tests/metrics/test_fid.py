"""Frechet distance, IS and precision/recall: agreement with clean-fid and torchmetrics, and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance as cleanfid_frechet_distance
from torchmetrics.image.fid import FrechetInceptionDistance

from ditlab.data.digits import DigitsDataModule
from ditlab.metrics.fid import (
    evaluate_images,
    fid_from_features,
    fid_interval,
    frechet_distance,
    gaussian_stats,
    inception_score,
    precision_recall,
)


def correlated(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing + shift


@pytest.mark.parametrize("n, dim", [(500, 32), (40, 64)])  # full-rank and singular covariances
def test_frechet_distance_equals_cleanfid(n, dim):
    mu1, sigma1 = gaussian_stats(correlated(n, dim, seed=0))
    mu2, sigma2 = gaussian_stats(correlated(n, dim, seed=1, shift=0.3) * 1.5)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    theirs = cleanfid_frechet_distance(mu1.numpy(), sigma1.numpy(), mu2.numpy(), sigma2.numpy())
    assert ours > 1.0
    assert abs(ours - theirs) < 1e-4, (ours, theirs)


def test_gaussian_stats_match_numpy():
    features = correlated(100, 8, seed=3)
    mu, sigma = gaussian_stats(features)
    np.testing.assert_allclose(mu.numpy(), features.numpy().mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(features.numpy(), rowvar=False), atol=1e-12)


def test_fid_equals_torchmetrics_with_our_feature_network(digits_features):
    data = DigitsDataModule(image_size=16)
    data.setup()
    real, fake = data.train_set.tensors[0][:400], data.val_set.tensors[0]
    metric = FrechetInceptionDistance(feature=digits_features, normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs = metric.compute().item()
    ours = fid_from_features(digits_features(real), digits_features(fake))
    assert ours > 1.0
    assert abs(ours - theirs) < 1e-4 * max(1.0, ours), (ours, theirs)


def test_distance_of_a_set_to_itself_is_zero():
    features = correlated(300, 16, seed=4)
    assert abs(fid_from_features(features, features)) < 1e-8


def test_mean_shift_follows_the_closed_form():
    features = correlated(400, 16, seed=5)
    shift = torch.linspace(-1, 1, 16, dtype=torch.float64)
    for scale in (0.5, 1.0, 2.0):
        # same covariance: FD = |shift|^2 exactly
        assert fid_from_features(features, features + scale * shift) == pytest.approx(
            (scale * shift).square().sum().item(), rel=1e-8
        )
    # scaled covariance S2 = c^2 S1: FD = |d|^2 + tr(S1) (1 - c)^2
    mu, sigma = gaussian_stats(features)
    difference = (3.0 * mu + shift) - mu
    expected = difference.square().sum().item() + sigma.trace().item() * (1 - 3.0) ** 2
    assert fid_from_features(features, features * 3.0 + shift) == pytest.approx(expected, rel=1e-8)


def test_bootstrap_interval_holds_the_fid_and_narrows_with_more_samples():
    from ditlab.metrics.reference import ReferenceStats

    reference = correlated(4000, 8, seed=6)
    mu, sigma = gaussian_stats(reference)
    stats = ReferenceStats("gaussian", mu, sigma, len(reference))
    widths = []
    for n in (200, 3200):
        generated = correlated(n, 8, seed=7, shift=0.3)
        fid = fid_from_features(generated, reference)
        low, high = fid_interval(generated, stats, rounds=100)
        assert low < fid < high
        assert fid_interval(generated, stats, rounds=100) == (low, high)  # seeded: reproducible
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # 16x the samples: about a quarter of the width


def test_precision_recall_of_identical_sets_is_one_and_of_far_sets_zero():
    features = correlated(200, 8, seed=6)
    assert precision_recall(features, features) == (1.0, 1.0)
    assert precision_recall(features, features + 100.0) == (0.0, 0.0)
    # generated samples collapsed onto one corner of the reference (mode collapse): precise, poor recall
    corner = features[torch.cdist(features[:1], features)[0].argsort()[:30]]
    precision, recall = precision_recall(features, corner)
    assert precision == 1.0 and recall < 0.5


def test_inception_score_bounds():
    confident = torch.eye(10).repeat(5, 1) * 50.0  # every class equally often, each sample certain
    assert inception_score(confident)[0] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(torch.zeros(50, 10))[0] == pytest.approx(1.0)
    single = torch.zeros(50, 10)
    single[:, 3] = 50.0  # certain, but always the same class
    assert inception_score(single)[0] == pytest.approx(1.0, abs=1e-6)
    mean, std = inception_score(confident, split_size=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6


def test_result_names_its_features_and_noise_scores_badly(digits_features):
    data = DigitsDataModule(image_size=16)
    data.setup()
    val = data.val_set.tensors[0]
    good = evaluate_images(val, extractor=digits_features)
    noise = evaluate_images(torch.rand_like(val) * 2 - 1, extractor=digits_features)
    assert good["fid_features"] == "digits-classifier" and good["num_samples"] == len(val)
    assert set(good) >= {"fid", "is", "precision", "recall", "reference", "reference_samples"}
    assert good["fid"] < 20 and noise["fid"] > 200 and noise["fid"] > 20 * good["fid"]
    assert good["is"] > 7 and noise["is"] < good["is"]
    assert good["precision"] > 0.9 and noise["precision"] < 0.1
