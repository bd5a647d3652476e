"""The embedded default dataset: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes).

It ships inside scikit-learn, so every config runs on a fresh machine with no network. Images are
scaled from 0..16 to [-1, 1] and optionally resized (bilinear) so a DiT with patch 2 has enough tokens.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ditlab.distributed import data_parallel_split

CLASS_NAMES = [str(d) for d in range(10)]


class SeededSampler(DistributedSampler):
    """Shuffles with ``torch.Generator().manual_seed(seed + epoch)``, so an epoch's order never depends on the
    global RNG, deals it across processes and can start mid-epoch.

    Process ``rank`` of ``world_size`` takes positions ``rank, rank + W, ...`` of the epoch's order (cut to a
    multiple of ``W`` so every process has as many batches), so ``W`` processes with batch ``B/W`` together see
    the batches one process with batch ``B`` sees. The position is kept in the *global* order, so a checkpoint
    resumes mid-epoch on any number of processes: after ``load_state_dict`` the next ``iter()`` skips what the
    interrupted run had consumed (Lightning restarts a non-stateful loader from the epoch's start). It is a
    ``DistributedSampler`` only so that Lightning does not wrap it in one.
    """

    def __init__(self, num_items: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_items, self.seed, self.rank, self.num_replicas = num_items, seed, rank, world_size
        self.shuffle, self.drop_last = True, True
        self.epoch = 0
        self.consumed = 0  # positions of the global order handed out in the current epoch (all processes)
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start; a saved position only applies to the epoch it was saved in
        (a checkpoint taken after an epoch's last batch resumes at the next epoch's start)."""
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items // self.num_replicas

    def __iter__(self):
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        world = self.num_replicas
        mine = order[: len(self) * world][self.rank :: world]
        start, self._start = self._start // world, 0
        self.consumed = start * world
        for index in mine[start:].tolist():
            self.consumed += world
            yield index

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._start = int(state["epoch"]), int(state["consumed"])


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning sees as stateful: its position is saved in every checkpoint and restored on resume."""

    def state_dict(self) -> dict:
        return self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if state and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state)


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
        seed = self.shuffle_seed
        rank, world_size = data_parallel_split(getattr(self, "trainer", None))
        sampler = SeededSampler(len(self.train_set), seed=seed, rank=rank, world_size=world_size)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                   generator=torch.Generator().manual_seed(seed))  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
