"""The training order every datamodule uses: one seeded order per epoch, dealt across processes, resumable.

Process ``rank`` of ``W`` takes positions ``rank, rank + W, ...`` of the epoch's order, so ``W`` processes with
batch ``B/W`` together see the batches one process with batch ``B`` sees (and, with the global-batch training
draws of ``ditlab.diffusion.global_batch``, train the same run). The position is saved in checkpoints in
global terms, so a run resumes mid-epoch on any number of processes.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ditlab.distributed import data_parallel_split


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


def training_loader(dataset: Dataset, batch_size: int, seed: int, trainer=None, num_workers: int = 0,
                    **options) -> ResumableDataLoader:  # fmt: skip
    """Shuffled, last partial batch dropped, dealt across the trainer's processes, position checkpointed."""
    rank, world_size = data_parallel_split(trainer)
    sampler = SeededSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers,
                               persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
                               **options)  # fmt: skip
