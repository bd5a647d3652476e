"""Feature extractors: the digits classifier (deterministic, accurate, cached, any size) and offline Inception."""

from __future__ import annotations

import pytest
import torch

from ditlab.data.digits import DigitsDataModule, digits_tensors
from ditlab.metrics import features
from ditlab.metrics.features import (
    INCEPTION_FILE,
    ClassifierRecipe,
    digits_classifier,
    feature_extractor,
    inception_v3,
)
from ditlab.metrics.fid import fid_from_features

QUICK = ClassifierRecipe(epochs=2)  # same code path, fewer epochs, so training twice stays cheap


def test_classifier_training_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = digits_classifier(cache_dir=tmp_path / "a", recipe=QUICK)
    assert torch.equal(torch.rand(1), expected_next)  # training did not consume the caller's random numbers
    second = digits_classifier(cache_dir=tmp_path / "b", recipe=QUICK)
    images, _ = digits_tensors(16)
    assert torch.equal(first(images[:200]), second(images[:200]))
    assert first.fingerprint == second.fingerprint
    other = digits_classifier(cache_dir=tmp_path / "c", recipe=ClassifierRecipe(epochs=2, seed=1))
    assert not torch.equal(first(images[:200]), other(images[:200]))


def test_classifier_is_cached_by_recipe_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path))
    trained = digits_classifier(recipe=QUICK)
    files = list(tmp_path.glob("digits-classifier-*.pt"))
    assert [f.name for f in files] == [f"digits-classifier-{QUICK.digest()}.pt"]
    monkeypatch.setattr(features, "train_digits_classifier", lambda recipe: pytest.fail("trained again"))
    loaded = digits_classifier(recipe=QUICK)
    assert loaded.fingerprint == trained.fingerprint and loaded.accuracy == trained.accuracy
    assert ClassifierRecipe(epochs=3).digest() != QUICK.digest()


def test_classifier_is_accurate_on_held_out_digits(digits_features):
    assert digits_features.name == "digits-classifier" and digits_features.num_features == 64
    assert digits_features.accuracy > 0.9
    images, labels = digits_tensors(16)
    _, logits = digits_features.features_and_logits(images)
    assert (logits.argmax(1) == labels).float().mean() > 0.95


@pytest.mark.parametrize("size, channels", [(8, 1), (16, 1), (32, 1), (16, 3), (20, 1)])
def test_classifier_accepts_any_size_and_channels(digits_features, size, channels):
    images, labels = digits_tensors(size)
    images = images[:300].expand(-1, channels, -1, -1)
    features, logits = digits_features.features_and_logits(images)
    assert features.shape == (300, 64) and logits.shape == (300, 10)
    assert (logits.argmax(1) == labels[:300]).float().mean() > 0.9


def test_val_digits_are_close_to_train_digits_and_noise_is_far(digits_features):
    data = DigitsDataModule(image_size=16)
    data.setup()
    train, val = data.train_set.tensors[0], data.val_set.tensors[0]
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(val.shape, generator=generator) * 2 - 1
    close = fid_from_features(digits_features(train), digits_features(val))
    far = fid_from_features(digits_features(train), digits_features(noise))
    assert close < 25 and far > 300 and far > 20 * close


def test_inception_without_weights_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("DITLAB_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("DITLAB_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("DITLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as error:
        inception_v3()
    message = str(error.value)
    assert "\n" not in message and INCEPTION_FILE in message
    assert "DITLAB_INCEPTION_WEIGHTS" in message and "https://" in message
    with pytest.raises(FileNotFoundError, match="do not exist"):
        inception_v3(tmp_path / "nowhere.pth")


def test_factory_names_the_choices():
    with pytest.raises(ValueError, match="digits-classifier"):
        feature_extractor("resnet")


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A randomly initialised Inception-v3 state dict in torch-fidelity's layout (no real weights offline)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    patch = pytest.MonkeyPatch()
    patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: None)  # never download
    patch.setattr(
        fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict, **kw: None
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        patch.undo()
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(network.state_dict(), path)
    return path


@pytest.mark.slow
def test_inception_pipeline_runs_on_small_grey_images(random_inception_weights, monkeypatch):
    monkeypatch.setenv("DITLAB_INCEPTION_WEIGHTS", str(random_inception_weights))
    extractor = feature_extractor("inception-v3", batch_size=2)
    images, _ = digits_tensors(16)
    features, logits = extractor.features_and_logits(images[:3])  # two batches, grey 16x16 -> RGB 299x299
    assert extractor.name == "inception-v3"
    assert features.shape == (3, 2048) and logits.shape == (3, 1008)
    torch.testing.assert_close(extractor(images[2:3]), features[2:3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, features @ extractor.network.fc.weight.T)


def test_classifier_trains_when_first_needed_inside_no_grad(tmp_path):
    """Sampling code runs under no_grad; the first evaluation there must still be able to train the network."""
    with torch.no_grad():
        extractor = digits_classifier(cache_dir=tmp_path, recipe=QUICK)
    assert extractor(digits_tensors(16)[0][:4]).shape[0] == 4
