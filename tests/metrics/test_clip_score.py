"""CLIP score: 100 * max(cos, 0) per pair on constructed embeddings, its sum-reduced state (2 gloo processes =
1 process), and the prompts text-conditioned evaluation draws."""

from __future__ import annotations

import json
import multiprocessing
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ditlab.metrics.clip_score import CLIPScore, pair_scores
from ditlab.metrics.text_eval import caption_prompts, clip_score_of


def score(images: torch.Tensor, texts: torch.Tensor) -> float:
    metric = CLIPScore()
    metric.update(images, texts)
    return float(metric.compute())


def test_identical_orthogonal_and_opposite_embeddings():
    vectors = torch.randn(5, 8)
    assert score(vectors, 3 * vectors) == pytest.approx(100.0)  # scale does not matter
    assert score(torch.eye(4)[:2], torch.eye(4)[2:]) == 0.0
    assert score(vectors, -vectors) == 0.0  # clamped per pair, never negative


def test_pairs_are_clamped_before_the_mean():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    texts = torch.tensor([[0.6, 0.8], [-1.0, 0.0]])  # cosines 0.6 and -1
    assert pair_scores(images, texts).tolist() == pytest.approx([60.0, 0.0])
    assert score(images, texts) == pytest.approx(30.0)


def test_batches_accumulate_and_bad_input_is_refused():
    images, texts = torch.randn(10, 6), torch.randn(10, 6)
    metric = CLIPScore()
    metric.update(images[:3], texts[:3])
    metric.update(images[3:], texts[3:])
    assert float(metric.compute()) == pytest.approx(pair_scores(images, texts).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        CLIPScore().update(torch.randn(3, 6), torch.randn(2, 6))
    with pytest.raises(ValueError, match="no pairs"):
        CLIPScore().compute()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def embeddings(count: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 16, generator=generator), torch.randn(count, 16, generator=generator)


def score_share(rank: int, world: int, port: int, out: Path) -> None:
    """One gloo rank: score its contiguous share (rank 1 gets one pair fewer), write the reduced score."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    images, texts = embeddings()
    per_rank = -(-len(images) // world)
    share = slice(rank * per_rank, (rank + 1) * per_rank)
    metric = CLIPScore()
    metric.update(images[share], texts[share])
    result = {"score": float(metric.compute()), "pairs": len(images[share])}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    """Forked ranks (the imports are inherited, so this takes a second) reduce to the single-process score."""
    port, context = free_port(), multiprocessing.get_context("fork")
    ranks = [context.Process(target=score_share, args=(rank, 2, port, tmp_path)) for rank in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=120)
    assert [process.exitcode for process in ranks] == [0, 0]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["pairs"] for r in results] == [19, 18]
    single = score(*embeddings())
    assert results[0]["score"] == results[1]["score"] == pytest.approx(single, rel=1e-6)


def test_caption_prompts_from_file_or_validation(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a small red 3 on a black background\n\na large blue 7 on a grey background\n")
    assert caption_prompts(str(path), 3) == ["a small red 3 on a black background",
                                             "a large blue 7 on a grey background",
                                             "a small red 3 on a black background"]  # fmt: skip
    from ditlab.data.scenes import DigitScenes

    assert caption_prompts("validation", 4) == DigitScenes("validation").captions(range(4))
    with pytest.raises(FileNotFoundError, match="captions file .* does not exist"):
        caption_prompts(str(tmp_path / "absent.txt"), 2)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="holds no captions"):
        caption_prompts(str(tmp_path / "empty.txt"), 2)
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        clip_score_of(torch.zeros(3, 3, 32, 32), ["a", "b"])
