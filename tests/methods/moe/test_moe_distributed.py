"""Experts under two CPU processes (gloo): DDP and FSDP2 train what one process trains (with the balance loss over
the global batch), and Dense2MoE's Mixture-of-Blocks stage runs sharded. Real ``python -m ditlab fit`` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ditlab.analysis import scalar_series
from ditlab.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[3]
TINY = [
    "--model.init_args.network.hidden_size", "32",
    "--model.init_args.network.depth", "2",
    "--model.init_args.network.num_heads", "2",
    "--model.init_args.network.mlp_options.balance_scope", "global",
    "--model.init_args.sampling.steps", "2",
    "--model.init_args.warmup_steps", "0",
    "--data.init_args.image_size", "8",
    "--trainer.enable_progress_bar", "false",
    "--trainer.log_every_n_steps", "1",
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.val_check_interval", "3",
]  # fmt: skip


def distributed_tests():
    """tests/test_distributed.py as a module: its process setups (``STRATEGIES``) are the ones every
    multi-process test runs."""
    import importlib.util

    if "distributed_test_helpers" not in sys.modules:
        spec = importlib.util.spec_from_file_location("distributed_test_helpers", ROOT / "tests" / "test_distributed.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["distributed_test_helpers"]


def fit(out: Path, config: Path, strategy: str, *args: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "ditlab", "fit", "--config", str(config), *distributed_tests().STRATEGIES[strategy],
               "--trainer.logger.init_args.save_dir", str(out), *args]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=out.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(out.glob("*/version_*"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dit_moe_trains_the_same_on_two_processes(tmp_path, strategy):
    config = ROOT / "configs" / "dit_moe.yaml"
    steps = ["--trainer.max_steps", "3"]
    one = fit(tmp_path / "one" / "runs", config, "single", *TINY, *steps, "--data.init_args.batch_size", "16")
    two = fit(tmp_path / "two" / "runs", config, strategy, *TINY, *steps, "--data.init_args.batch_size", "8")
    for tag in ("train/loss", "train/loss_balance"):
        ours, theirs = dict(scalar_series(two, tag)), dict(scalar_series(one, tag))
        assert sorted(ours) == [0, 1, 2]
        assert all(ours[s] == pytest.approx(theirs[s], rel=1e-5, abs=1e-6) for s in ours), (tag, ours, theirs)
    state = {k: v for k, v in read_checkpoint(two / "checkpoints" / "final.ckpt")["state_dict"].items()
             if k.startswith(("network.", "ema."))}  # fmt: skip
    reference = read_checkpoint(one / "checkpoints" / "final.ckpt")["state_dict"]
    assert any(".mlp.experts.up" in key for key in state)
    for key, value in state.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-4, atol=2e-6, msg=key)


@pytest.mark.slow
def test_dense2moe_with_a_block_mixture_stage_runs_sharded(tmp_path):
    teacher_run = fit(tmp_path / "teacher" / "runs", ROOT / "configs" / "dit.yaml", "single",
                      "--model.init_args.network.hidden_size", "32", "--model.init_args.network.depth", "4",
                      "--model.init_args.network.num_heads", "2", "--data.init_args.image_size", "8",
                      "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false")  # fmt: skip
    config = yaml.safe_load((ROOT / "configs" / "dense2moe.yaml").read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "ditlab.callbacks.progressive.ProgressiveDistillation", "init_args": {"at_steps": [2], "blocks": [2]}},
        {"class_path": "ditlab.callbacks.compression_report.CompressionReport",
         "init_args": {"num_samples": 0, "throughput_batch": 4, "steps": 2}}]  # fmt: skip
    model = config["model"]["init_args"]
    model["teacher"]["checkpoint"] = str(teacher_run / "checkpoints" / "final.ckpt")
    model["carve"].update(num_experts=4, shared_width=16, calibration_images=32)
    model["mixture"]["group_size"] = 2
    config["data"]["init_args"].update(batch_size=4, image_size=8)
    path = tmp_path / "dense2moe.yaml"
    path.write_text(yaml.safe_dump(config))
    run = fit(tmp_path / "runs", path, "fsdp", "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false",
              "--trainer.log_every_n_steps", "1")  # fmt: skip
    assert sorted(dict(scalar_series(run, "train/loss_balance"))) == [0, 1, 2, 3]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["student"]["blocks"] == 2 and summary["mixture_of_blocks"]["active"] == 1
    assert summary["student"]["activated_parameters"] < summary["teacher"]["activated_parameters"]
    assert (run / "checkpoints" / "final.ckpt").is_dir()  # a sharded checkpoint folder
