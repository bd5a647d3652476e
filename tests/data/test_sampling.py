"""The shared training order: one seeded order per epoch, dealt across processes, resumable on any count."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from ditlab.data.sampling import SeededSampler, training_loader


def test_sampler_deals_one_order_and_resumes_on_another_process_count():
    single = list(SeededSampler(20, seed=1))
    ranks = [list(SeededSampler(20, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert [index for pair in zip(*ranks) for index in pair] == single
    first = SeededSampler(20, seed=1, rank=0, world_size=2)
    iterator = iter(first)
    [next(iterator) for _ in range(3)]  # 3 per process: 6 positions of the global order
    resumed = SeededSampler(20, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert list(resumed) == single[6:]


def test_every_process_gets_as_many_batches():
    lengths = [len(list(SeededSampler(21, seed=0, rank=r, world_size=4))) for r in range(4)]
    assert lengths == [5, 5, 5, 5]  # 21 cut to 20, so no process waits for a batch the others never take


class FakeTrainer:
    """What ``training_loader`` reads from a trainer: the strategy's split of each batch."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.strategy = type("Strategy", (), {"distributed_sampler_kwargs": {"rank": rank, "num_replicas": world_size}})


def test_two_processes_at_half_batch_see_one_process_batches():
    dataset = TensorDataset(torch.arange(40))
    single = [batch[0].tolist() for batch in training_loader(dataset, 8, seed=3)]
    halves = [[batch[0].tolist() for batch in training_loader(dataset, 4, seed=3, trainer=FakeTrainer(r, 2))]
              for r in range(2)]  # fmt: skip
    assert len(halves[0]) == len(halves[1]) == len(single) == 5
    for step, batch in enumerate(single):
        assert sorted(halves[0][step] + halves[1][step]) == sorted(batch)
