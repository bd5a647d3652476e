"""Training randomness that does not depend on the number of processes.

Every process draws the noise, timesteps and label drop-outs of the *global* batch from the same seeded
stream and keeps only its own rows: positions ``rank, rank + W, rank + 2W, ...``, the ones a
``DistributedSampler``-style split deals it. Two processes with batch B/2 therefore see exactly the draws
one process with batch B sees (so DDP/FSDP runs match single-process runs), and no two ranks share noise
(seeding every rank alike and drawing locally would give all ranks the same noise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def draw_rows(draw: Callable[[int], torch.Tensor], local_batch: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """``draw(n)`` returns ``n`` rows; this returns this rank's ``local_batch`` rows of a global draw."""
    if world_size == 1:
        return draw(local_batch)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return draw(local_batch * world_size)[rank::world_size]
