"""Image-folder flips belong to the run, not to a loader worker (issue 25): two processes at half the batch, or
any number of workers, see the flips one process at the full batch sees, and a resumed epoch the same flips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditlab.data.images import FlipSampler, ImageFolderDataModule


class FakeTrainer:
    """What a training loader reads from a trainer: the strategy's split of each batch."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.strategy = type("Strategy", (), {"distributed_sampler_kwargs": {"rank": rank, "num_replicas": world_size}})


def image_folder(root: Path, per_class: int = 8) -> Path:
    """``root/<class>/<i>.png``: 16 random 8x8 images, none its own mirror image."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{index}.png")
    return root


def epochs(root: Path, batch_size: int, rank: int = 0, world_size: int = 1, workers: int = 0, count: int = 2):
    """The training batches of ``count`` epochs as one process of ``world_size`` sees them."""
    torch.manual_seed(7)  # the run's seed, which the loader takes its stream from
    data = ImageFolderDataModule(str(root), image_size=8, batch_size=batch_size, val_fraction=0.0, num_workers=workers)
    data.setup()
    data.trainer = FakeTrainer(rank, world_size)
    loader = data.train_dataloader()
    batches = []
    for epoch in range(count):
        loader.sampler.set_epoch(epoch)
        batches += [images for images, _ in loader]
    return batches, data


def rows(images: torch.Tensor) -> list[bytes]:
    return sorted(image.numpy().tobytes() for image in images)


def test_two_processes_and_any_workers_see_one_process_flips(tmp_path):
    root = image_folder(tmp_path / "images")
    single, data = epochs(root, batch_size=8)
    halves = [epochs(root, batch_size=4, rank=rank, world_size=2, workers=rank)[0] for rank in range(2)]  # 0 and 1 worker
    assert len(single) == len(halves[0]) == len(halves[1]) == 4
    for step, batch in enumerate(single):
        assert rows(batch) == rows(torch.cat([halves[0][step], halves[1][step]])), step
    plain = {data.train_set.load(i).numpy().tobytes() for i in range(len(data.train_set))}
    seen = [image.numpy().tobytes() for batch in single for image in batch]
    mirrored = [image not in plain for image in seen]
    assert 8 <= sum(mirrored) <= 24 and mirrored[:16] != mirrored[16:]  # about half of 32 coins, new ones each epoch


def test_a_resumed_epoch_sees_the_flips_of_the_uninterrupted_one(tmp_path):
    data = ImageFolderDataModule(str(image_folder(tmp_path / "images")), image_size=8, batch_size=4, val_fraction=0.0)
    data.setup()
    sampler = FlipSampler(16, seed=3, rank=0, world_size=2)
    whole = list(sampler)
    iterator = iter(sampler)
    [next(iterator) for _ in range(3)]
    resumed = FlipSampler(16, seed=3)  # one process now, from the saved position
    resumed.load_state_dict(sampler.state_dict())
    both = [list(FlipSampler(16, seed=3, rank=rank, world_size=2)) for rank in range(2)]
    single = list(FlipSampler(16, seed=3))
    assert [key for pair in zip(*both) for key in pair] == single and whole == both[0]
    assert list(resumed) == single[6:]
    index, flip = single[0]
    assert torch.equal(data.train_set[(index, flip)][0], data.train_set.load(index).flip(-1) if flip
                       else data.train_set.load(index))  # fmt: skip
