"""Reference statistics: digits (cached), ADM-style .npz batches, clean-fid names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditlab.data.digits import digits_tensors
from ditlab.metrics.fid import evaluate_images, gaussian_stats
from ditlab.metrics.reference import images_from_uint8, reference_stats
from ditlab.tools.sample import to_uint8


def test_digits_reference_is_all_digits_and_cached_on_disk(digits_features, tmp_path):
    stats = reference_stats("digits", digits_features, image_size=8, cache_dir=tmp_path)
    images, _ = digits_tensors(8)
    mu, sigma = gaussian_stats(digits_features(images))
    assert stats.num_samples == 1797 and stats.features.shape == (1797, 64)
    torch.testing.assert_close(stats.mu, mu)
    torch.testing.assert_close(stats.sigma, sigma)
    cached = list(tmp_path.glob("reference-digits-8-*.pt"))
    assert len(cached) == 1 and digits_features.fingerprint in cached[0].name
    again = reference_stats("digits", digits_features, image_size=8, cache_dir=str(tmp_path))
    torch.testing.assert_close(again.sigma, sigma)


def test_uint8_round_trip_matches_the_adm_layout():
    images, _ = digits_tensors(16)
    batch = to_uint8(images[:5])
    assert batch.shape == (5, 16, 16, 1) and batch.dtype == np.uint8
    assert (images_from_uint8(batch) - images[:5]).abs().max() <= 1 / 127.5


def test_npz_reference_from_images_and_from_mu_sigma(digits_features, tmp_path):
    images, _ = digits_tensors(16)
    batch = to_uint8(images)
    np.savez(tmp_path / "images.npz", arr_0=batch)
    from_images = reference_stats(str(tmp_path / "images.npz"), digits_features, image_size=16)
    assert from_images.num_samples == 1797 and from_images.features is not None
    np.savez(tmp_path / "stats.npz", mu=from_images.mu.numpy(), sigma=from_images.sigma.numpy())
    from_stats = reference_stats(str(tmp_path / "stats.npz"), digits_features, image_size=16)
    assert from_stats.features is None
    torch.testing.assert_close(from_stats.sigma, from_images.sigma)
    generated = images[::7]
    with_images = evaluate_images(
        generated, reference=str(tmp_path / "images.npz"), extractor=digits_features
    )
    with_stats = evaluate_images(generated, reference=str(tmp_path / "stats.npz"), extractor=digits_features)
    assert with_images["fid"] == pytest.approx(with_stats["fid"], rel=1e-9)
    assert "precision" in with_images and "precision" not in with_stats  # no reference features to compare


def test_npz_reference_with_foreign_stats_and_no_images_is_refused(digits_features, tmp_path):
    np.savez(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="does not fit digits-classifier features"):
        reference_stats(str(tmp_path / "inception.npz"), digits_features)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reference_stats(str(tmp_path / "missing.npz"), digits_features)
    with pytest.raises(ValueError, match="unknown reference"):
        reference_stats("imagenet", digits_features)


def test_cleanfid_name_needs_its_file(digits_features, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        reference_stats("cleanfid:no_such_dataset_clean_train_32", digits_features)
    assert "no_such_dataset_clean_train_32.npz" in str(error.value) and "\n" not in str(error.value)
    np.savez(tmp_path / "mine_clean_custom_na.npz", mu=np.zeros(64), sigma=np.eye(64))
    stats = reference_stats(f"cleanfid:{tmp_path / 'mine_clean_custom_na.npz'}", digits_features)
    assert stats.name == "cleanfid:mine_clean_custom_na" and stats.mu.shape == (64,)
