"""The embedded default dataset: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes).

It ships inside scikit-learn, so every config runs on a fresh machine with no network. Images are
scaled from 0..16 to [-1, 1] and optionally resized (bilinear) so a DiT with patch 2 has enough tokens.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from ditlab.data.sampling import training_loader

CLASS_NAMES = [str(d) for d in range(10)]


def digits_tensors(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: ``images: (N, 1, S, S)`` in [-1, 1] and ``labels: (N,)``."""
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0 * 2.0 - 1.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(-1, 1), torch.from_numpy(bunch.target).long()


class DigitsDataModule(L.LightningDataModule):
    """Train/val split of the digits, deterministic for a given ``split_seed``.

    Batches are ``(images: (B, 1, S, S) in [-1, 1], labels: (B,))``. The training order is seeded per epoch
    (``shuffle_seed``, default: the run's ``seed_everything`` seed) and resumes mid-epoch exactly.
    """

    num_classes = 10
    channels = 1
    class_names = CLASS_NAMES

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 16,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} is out of range; choose a value in (0, 1), e.g. 0.1")
        if image_size < 1:
            raise ValueError(f"data.image_size={image_size} must be a positive pixel count, e.g. 16")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be at least 1")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.shuffle_seed = torch.initial_seed() % 2**62 if shuffle_seed is None else shuffle_seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = digits_tensors(self.image_size)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        num_val = max(1, int(round(self.val_fraction * len(labels))))
        val_index, train_index = order[:num_val], order[num_val:]
        if self.batch_size > len(train_index):
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the digits training split "
                f"({len(train_index)} images); use a batch size of at most {len(train_index)}"
            )
        self.train_set = TensorDataset(images[train_index], labels[train_index])
        self.val_set = TensorDataset(images[val_index], labels[val_index])

    def train_dataloader(self) -> DataLoader:
        return training_loader(self.train_set, self.batch_size, self.shuffle_seed, getattr(self, "trainer", None),
                               num_workers=self.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
