"""CacheRouterModule through ``ditlab fit``: exact resume, TensorBoard, export to a plan that ``ditlab sample`` runs,
refusal of another schedule, and two processes (DDP) training what one trains."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditlab.analysis import scalar_series
from ditlab.checkpoint import read_checkpoint
from ditlab.cli import main

ROOT = Path(__file__).resolve().parents[4]


def final(run: Path) -> dict:
    return read_checkpoint(run / "checkpoints" / "final.ckpt")


def test_resume_mid_trajectory_is_exact_and_tensorboard_has_the_router(tmp_path, teacher_file, router_args):
    """6 steps straight, or 4 (stopping inside the second 3-call trajectory) then 2 more: the same router."""
    assert main(router_args(teacher_file, tmp_path / "straight", steps=6)) == 0
    assert main(router_args(teacher_file, tmp_path / "first", steps=4)) == 0
    first = next((tmp_path / "first").glob("harmonica/version_0"))
    assert final(first)["cache_router"]["rollout"]["index"] == 2
    assert main([*router_args(teacher_file, tmp_path / "first", steps=6), "--ckpt_path",
                 str(first / "checkpoints" / "final.ckpt")]) == 0  # fmt: skip
    straight = next((tmp_path / "straight").glob("harmonica/version_0"))
    resumed = next((tmp_path / "first").glob("harmonica/version_1"))
    assert torch.equal(final(resumed)["state_dict"]["router.theta"], final(straight)["state_dict"]["router.theta"])
    assert list(final(straight)["state_dict"]) == ["router.theta"]  # the checkpoint holds the router alone
    losses = dict(scalar_series(straight, "train/loss"))
    assert dict(scalar_series(resumed, "train/loss")) == {step: losses[step] for step in (4, 5)}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight), size_guidance={"images": 0}).Reload()
    assert {"router/scores", "router/computed"} <= set(events.Tags()["images"])
    assert {"train/mse", "train/sparsity", "router/computed_fraction"} <= set(events.Tags()["scalars"])


def test_export_runs_in_ditlab_sample_and_another_schedule_is_refused(tmp_path, teacher_file, router_args, capsys):
    assert main([*router_args(teacher_file, tmp_path / "runs", "l2c.yaml", steps=3)]) == 0
    ckpt = next((tmp_path / "runs").glob("l2c/version_0/checkpoints/final.ckpt"))
    plan = tmp_path / "plan.json"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(plan), "--threshold", "0.5"]) == 0
    assert main(["sample", "--ckpt", str(teacher_file), "--num", "3", "--out", str(tmp_path / "samples"),
                 "--sampler", "ddim", "--steps", "4", "--cache", f"plan:{plan}"]) == 0  # fmt: skip
    assert len(list((tmp_path / "samples").glob("*.png"))) == 3
    capsys.readouterr()
    assert main(["export", "--ckpt", str(ckpt), "--out", str(plan), "--steps", "8"]) == 2
    assert "trained for ddim at 4 steps, not ddim at 8 steps" in capsys.readouterr().err
    from ditlab.diffusion.config import SamplingConfig
    from ditlab.methods.sampling.cache_router import CacheRouterModule
    from ditlab.methods.teacher import TeacherConfig

    other = CacheRouterModule(TeacherConfig(checkpoint=str(teacher_file)),
                              sampling=SamplingConfig(sampler="ddpm", steps=4, cfg_scale=2.0))  # fmt: skip
    other.configure_model()
    with pytest.raises(ValueError, match="trained for ddim at 4 steps, not ddpm at 4 steps"):
        other.on_load_checkpoint(read_checkpoint(ckpt))


@pytest.mark.slow
def test_two_processes_train_the_router_one_process_trains(tmp_path, teacher_file, router_args):
    """DDP on two CPU processes (gloo) at batch 2 each = one process at batch 4: the same router."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    runs = {}
    for name, extra in {"one": [], "two": ["--config", str(ROOT / "configs" / "trainer" / "ddp.yaml"),
                                           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
                                           "--data.init_args.batch_size", "2"]}.items():  # fmt: skip
        command = [sys.executable, "-m", "ditlab", *router_args(teacher_file, tmp_path / name, steps=3), *extra]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = final(next((tmp_path / name).glob("harmonica/version_0")))
    torch.testing.assert_close(runs["two"]["state_dict"]["router.theta"], runs["one"]["state_dict"]["router.theta"],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert not torch.equal(runs["one"]["state_dict"]["router.theta"][1], torch.zeros(8))  # it trained (init 0)
