"""Shared fixtures: a tiny digits config that trains in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")
ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--model.init_args.network.hidden_size", "32",
    "--model.init_args.network.depth", "2",
    "--model.init_args.network.num_heads", "2",
    "--model.init_args.sampling.steps", "5",
    "--data.init_args.batch_size", "16",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip


@pytest.fixture
def tiny_args(tmp_path: Path) -> list[str]:
    """CLI arguments for a tiny ``configs/dit.yaml`` run logging under ``tmp_path``."""
    return ["--config", str(ROOT / "configs" / "dit.yaml"), *TINY,
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]  # fmt: skip


@pytest.fixture(autouse=True, scope="session")
def one_thread_per_process():
    """Tiny networks run faster on one thread, and DDP tests start two processes on two cores."""
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
