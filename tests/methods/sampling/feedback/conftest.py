"""The CLI arguments that train on the tiny teacher checkpoint (``teacher_file`` in ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]


def fit_args(teacher: Path, save_dir: Path, config: str = "ilf.yaml", steps: int = 4) -> list[str]:
    """``ditlab fit`` arguments: ``config`` on the tiny teacher, 4 DDIM steps, 4 trajectories a step."""
    return ["fit", "--config", str(ROOT / "configs" / config), "--model.init_args.teacher.checkpoint", str(teacher),
            "--model.init_args.sampling.steps", "4", "--data.init_args.batch_size", "4",
            "--data.init_args.image_size", "8", "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(save_dir)]  # fmt: skip


@pytest.fixture(scope="session")
def router_args():
    """``router_args(teacher, save_dir, config="ilf.yaml", steps=4)``: see :func:`fit_args`."""
    return fit_args
