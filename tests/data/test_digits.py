import pytest
import torch

from ditlab.data.digits import DigitsDataModule, digits_tensors


def test_digits_are_the_real_sklearn_set_scaled_to_unit_range():
    images, labels = digits_tensors(image_size=8)
    assert images.shape == (1797, 1, 8, 8)
    assert images.min() == -1.0 and images.max() == 1.0
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_split_is_deterministic_disjoint_and_complete():
    first, second = DigitsDataModule(image_size=16), DigitsDataModule(image_size=16)
    first.setup(), second.setup()
    assert torch.equal(first.val_set.tensors[0], second.val_set.tensors[0])
    assert len(first.train_set) + len(first.val_set) == 1797
    assert len(first.val_set) == 180
    train_images = first.train_set.tensors[0].flatten(1)
    val_images = first.val_set.tensors[0].flatten(1)
    assert not any((train_images == row).all(1).any() for row in val_images[:20])
    batch_images, batch_labels = next(iter(first.train_dataloader()))
    assert batch_images.shape == (64, 1, 16, 16) and batch_labels.dtype == torch.long


def test_other_split_seed_gives_other_split():
    first, second = DigitsDataModule(split_seed=0), DigitsDataModule(split_seed=1)
    first.setup(), second.setup()
    assert not torch.equal(first.val_set.tensors[1], second.val_set.tensors[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"val_fraction": 1.5}, "val_fraction"), ({"image_size": 0}, "image_size"), ({"batch_size": 0}, "batch_size")],
)
def test_out_of_range_options_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


def test_batch_larger_than_dataset_is_refused_with_the_limit():
    module = DigitsDataModule(batch_size=5000)
    with pytest.raises(ValueError, match="at most 1617"):
        module.setup()
