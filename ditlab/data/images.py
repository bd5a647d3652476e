"""Class-labelled image folders (the ImageNet layout) and CIFAR-10, as ``(images in [-1, 1], labels)`` batches.

Image folders follow the recipe DiT (Peebles & Xie 2023) took from ADM (Dhariwal & Nichol 2021,
``guided_diffusion/image_datasets.py: center_crop_arr``): halve the image with a BOX filter while its short
side is at least twice the target, resize with BICUBIC so the short side equals the target, then crop the
centre; a random horizontal flip is the only augmentation. Classes are the sorted sub-folder names.

Flips are drawn like the training order (``ditlab.data.sampling``), not in the loader workers: one coin per image
and epoch from a stream seeded by the run's seed and the epoch, handed to the dataset with the index
(:class:`FlipSampler`). A run therefore sees the same flips on any number of processes and workers, and a resumed
run the flips the uninterrupted one saw.

A file that cannot be decoded never stops an epoch: it is reported once with a warning naming it, the
next readable image takes its place, and it is counted in :attr:`ImageFolderDataModule.skipped` (the
count lives in shared memory, so it includes what DataLoader workers found).

CIFAR-10 comes through torchvision and is downloaded only when ``download: true`` is asked.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ditlab.child_process import exit_with_parent
from ditlab.data.sampling import ResumableDataLoader, SeededSampler, training_loader
from ditlab.distributed import data_parallel_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class SkippedImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: ``(S, S, C)`` uint8 from a PIL image of any size and aspect ratio."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.array(image)
    top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def to_signed(array: np.ndarray) -> torch.Tensor:
    """``(H, W, C)`` or ``(H, W)`` uint8 -> ``(C, H, W)`` float32 in [-1, 1]."""
    images = torch.from_numpy(np.ascontiguousarray(array)).float() / 127.5 - 1.0
    return images.unsqueeze(0) if images.ndim == 2 else images.permute(2, 0, 1)


def class_folders(folder: Path) -> list[str]:
    """Sorted sub-folder names of ``folder``: the class names, label ``i`` for ``names[i]``."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist; expected {folder}/<class>/<image>.png"
        )
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """``(class_names, [(path, label), ...])`` for ``root/<class>/**/<image>``; classes sorted by name."""
    folder = Path(root).expanduser()
    classes = class_folders(folder)
    samples = []
    for label, name in enumerate(classes):
        for directory, subdirs, files in sorted(os.walk(folder / name, followlinks=True)):
            subdirs.sort()
            samples += [(os.path.join(directory, file), label) for file in sorted(files)
                        if file.lower().endswith(IMAGE_EXTENSIONS)]  # fmt: skip
    if not samples:
        raise FileNotFoundError(f"image folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)}) in class "
                                f"sub-folders; expected the ImageNet layout {folder}/<class>/<image>")  # fmt: skip
    return classes, samples


FLIP_STREAM = 0x666C6970  # keeps the flip coins' stream apart from the order's (both seeded by seed and epoch)


def epoch_flips(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """One fair coin per item for ``epoch`` of a run seeded ``seed`` (True: mirror it)."""
    return np.random.default_rng([seed, epoch, FLIP_STREAM]).random(num_items) < 0.5


class FlipSampler(SeededSampler):
    """:class:`~ditlab.data.sampling.SeededSampler`'s order (dealt across processes, resumable) with each index
    paired with its epoch's coin, ``(index, flip)``, for a dataset that takes such keys."""

    def __iter__(self):
        flips = epoch_flips(self.num_items, self.seed, self.epoch)
        for index in super().__iter__():
            yield index, bool(flips[index])


class KeyedFlips(Dataset):
    """``dataset[(index, flip)]``: ``dataset[index]``'s ``(image, label)``, mirrored when ``flip``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = key
        image, label = self.dataset[index]
        return (image.flip(-1) if flip else image), label


class ImageFolderDataset(Dataset):
    """``(image: (3, S, S) in [-1, 1], label)`` per file, ADM centre crop, optional random flip.

    ``dataset[(i, flip)]`` (what the training loader's :class:`FlipSampler` asks for) mirrors as ``flip`` says;
    ``dataset[i]`` alone flips with the global RNG when ``flip`` is set. :meth:`load` returns None for an
    unreadable file (the encoder uses it to leave the file out); indexing moves on to the next readable file
    instead, so a training epoch never stops.
    """

    def __init__(self, samples: list[tuple[str, int]], image_size: int, flip: bool = False) -> None:
        self.samples, self.image_size, self.flip = samples, image_size, flip
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.long)
        self.bad = torch.zeros(len(samples), dtype=torch.bool).share_memory_()
        """One flag per file, shared with DataLoader workers: True once it failed to decode."""

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return self.samples[index][0]

    def load(self, index: int) -> torch.Tensor | None:
        """The centre-cropped image ``(3, S, S)`` without flip, or None (and a warning) if it cannot be read."""
        if self.bad[index]:
            return None
        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                image.load()
                array = center_crop_arr(image.convert("RGB"), self.image_size)
        except UNREADABLE as error:
            self.bad[index] = True
            warnings.warn(f"skipped unreadable image {path}: {error}", SkippedImageWarning, stacklevel=2)
            return None
        return to_signed(array)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = key if isinstance(key, tuple) else (key, self.flip and bool(torch.rand(()) < 0.5))
        for offset in range(len(self)):
            current = (index + offset) % len(self)
            image = self.load(current)
            if image is not None:
                return (image.flip(-1) if flip else image), self.samples[current][1]
        raise FileNotFoundError(
            f"none of the {len(self)} images (e.g. {self.samples[0][0]}) could be decoded"
        )

    @property
    def skipped_files(self) -> list[str]:
        return [self.samples[i][0] for i in self.bad.nonzero().flatten().tolist()]


def _loader(dataset: Dataset, batch_size: int, num_workers: int, train: bool, trainer=None,
            flip: bool = False) -> DataLoader:  # fmt: skip
    """Training: seeded by the run's seed, dealt across processes, resumable mid-epoch, and with ``flip`` each
    index paired with its coin (``dataset`` takes ``(index, flip)`` keys); otherwise in file order. Workers
    never outlive this process (``exit_with_parent``)."""
    seed = torch.initial_seed() % 2**62
    options = {"pin_memory": torch.cuda.is_available(), "worker_init_fn": exit_with_parent}
    if train and flip:
        rank, world_size = data_parallel_split(trainer)
        return ResumableDataLoader(dataset, batch_size=batch_size, drop_last=True, num_workers=num_workers,
                                   sampler=FlipSampler(len(dataset), seed=seed, rank=rank, world_size=world_size),
                                   persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
                                   **options)  # fmt: skip
    if train:
        return training_loader(dataset, batch_size, seed, trainer, num_workers, **options)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=num_workers > 0,
                      **options)  # fmt: skip


def _check_batch(batch_size: int, available: int, what: str) -> None:
    if batch_size > available:
        raise ValueError(f"data.batch_size={batch_size} is larger than the {what} ({available} images); "
                         f"use a batch size of at most {available}")  # fmt: skip


class ImageFolderDataModule(L.LightningDataModule):
    """An ImageNet-layout folder; validation is ``val_root`` or a deterministic ``val_fraction`` of ``root``.

    Batches are ``(images: (B, 3, S, S) in [-1, 1], labels: (B,))``. ``skipped`` counts unreadable files
    met so far (train and val), ``skipped_files`` names them.
    """

    channels = 3

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        batch_size: int = 64,
        val_root: str | None = None,
        val_fraction: float = 0.01,
        split_seed: int = 0,
        flip: bool = True,
        num_workers: int = 4,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(
                f"data.val_fraction={val_fraction} is out of range; choose a value in [0, 1), e.g. 0.01"
            )
        if image_size < 1 or batch_size < 1:
            raise ValueError(
                f"data.image_size={image_size} and data.batch_size={batch_size} must be at least 1"
            )
        self.save_hyperparameters()
        self.root, self.val_root, self.image_size, self.batch_size = root, val_root, image_size, batch_size
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.flip, self.num_workers = flip, num_workers
        self._classes: list[str] | None = None
        self.train_set: ImageFolderDataset | None = None
        self.val_set: ImageFolderDataset | None = None

    @property
    def class_names(self) -> list[str]:
        if self._classes is None:
            self._classes = class_folders(Path(self.root).expanduser())
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._classes, samples = scan_image_folder(self.root)
        if self.val_root is not None:
            val_classes, val_samples = scan_image_folder(self.val_root)
            if val_classes != self._classes:
                raise ValueError(f"data.val_root {self.val_root} has classes {val_classes[:3]}... that differ from "
                                 f"data.root {self.root} ({self._classes[:3]}...); both need the same class folders")  # fmt: skip
            train_samples = samples
        else:
            generator = torch.Generator().manual_seed(self.split_seed)
            order = torch.randperm(len(samples), generator=generator).tolist()
            num_val = int(round(self.val_fraction * len(samples)))
            val_samples = [samples[i] for i in sorted(order[:num_val])]
            train_samples = [samples[i] for i in sorted(order[num_val:])]
        _check_batch(self.batch_size, len(train_samples), f"training split of {self.root}")
        self.train_set = ImageFolderDataset(train_samples, self.image_size, flip=self.flip)
        self.val_set = ImageFolderDataset(val_samples, self.image_size, flip=False)

    @property
    def skipped_files(self) -> list[str]:
        parts = [part for part in (self.train_set, self.val_set) if part is not None]
        return [name for part in parts for name in part.skipped_files]

    @property
    def skipped(self) -> int:
        """Unreadable files met so far (found in any DataLoader worker); for the run summary."""
        return len(self.skipped_files)

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_set, self.batch_size, self.num_workers, train=True, trainer=self.trainer,
                       flip=self.flip)  # fmt: skip

    def val_dataloader(self) -> DataLoader | list:
        if not len(self.val_set):
            return []
        return _loader(self.val_set, self.batch_size, self.num_workers, train=False)


class _SignedTransform:
    """PIL image -> ``(3, S, S)`` in [-1, 1], bicubic resize when ``S`` is not the native size."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), resample=Image.BICUBIC)
        return to_signed(np.asarray(image.convert("RGB")))


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 (Krizhevsky 2009) through torchvision: 50K train, the 10K test split for validation.

    Batches are ``(images: (B, 3, S, S) in [-1, 1], labels: (B,))``; ``S`` is 32 unless resized.
    Files are looked for in ``root/cifar-10-batches-py``; ``download: true`` fetches them there. ``train_set``
    items are unflipped: the training loader mirrors them (``flip``) by :class:`FlipSampler`'s coins.
    """

    num_classes = 10
    channels = 3
    class_names = CIFAR10_CLASSES
    skipped = 0

    def __init__(self, root: str = "data/cifar10", batch_size: int = 128, image_size: int = 32,
                 download: bool = False, flip: bool = True, num_workers: int = 2) -> None:  # fmt: skip
        super().__init__()
        if image_size < 1 or batch_size < 1:
            raise ValueError(
                f"data.image_size={image_size} and data.batch_size={batch_size} must be at least 1"
            )
        self.save_hyperparameters()
        self.root, self.batch_size, self.image_size = root, batch_size, image_size
        self.download, self.flip, self.num_workers = download, flip, num_workers
        self.train_set = self.val_set = None

    def _split(self, train: bool):
        from torchvision.datasets import CIFAR10

        root = Path(self.root).expanduser()
        transform = _SignedTransform(self.image_size)
        try:
            return CIFAR10(str(root), train=train, transform=transform, download=self.download)
        except (RuntimeError, OSError) as error:
            where = f"{root / 'cifar-10-batches-py'} (from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)"
            if self.download:
                raise FileNotFoundError(f"CIFAR-10 could not be downloaded to {root} ({error}); without network, "
                                        f"put the extracted cifar-10-batches-py folder at {where}") from None  # fmt: skip
            raise FileNotFoundError(f"CIFAR-10 is missing or corrupt under {root}: put the extracted folder at "
                                    f"{where}, or set data.download: true on a machine with network") from None  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set, self.val_set = self._split(train=True), self._split(train=False)
        _check_batch(self.batch_size, len(self.train_set), "CIFAR-10 training split")

    def train_dataloader(self) -> DataLoader:
        train_set = KeyedFlips(self.train_set) if self.flip else self.train_set
        return _loader(train_set, self.batch_size, self.num_workers, train=True, trainer=self.trainer, flip=self.flip)

    def val_dataloader(self) -> DataLoader:
        return _loader(self.val_set, self.batch_size, self.num_workers, train=False)
