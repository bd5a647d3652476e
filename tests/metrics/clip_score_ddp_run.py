"""Run by tests/metrics/test_clip_score.py: ``python clip_score_ddp_run.py RANK WORLD PORT OUT``.

Each rank joins a gloo process group, scores its contiguous share of fixed embeddings (unequal shares: rank 1
gets one pair fewer) with :class:`ditlab.metrics.clip_score.CLIPScore` and writes the reduced score to
``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ditlab.metrics.clip_score import CLIPScore


def embeddings(count: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 16, generator=generator), torch.randn(count, 16, generator=generator)


def main(rank: int, world: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    images, texts = embeddings()
    per_rank = -(-len(images) // world)
    share = slice(rank * per_rank, (rank + 1) * per_rank)
    metric = CLIPScore()
    metric.update(images[share], texts[share])
    (out / f"rank{rank}.json").write_text(json.dumps({"score": float(metric.compute()),
                                                      "pairs": len(images[share])}))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
