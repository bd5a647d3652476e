"""Runs that sample through more than their network (a learned router's plan, ILF's feedback block) sample from the
command line as they are, ``ditlab export`` prints commands that work as printed, and ``sample_checkpoint`` (the
README's one call) draws what ``ditlab sample`` draws. ``bench/sample_every_config.py`` covers every shipped config."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import torch

from ditlab.checkpoint import sample_checkpoint
from ditlab.cli import main
from ditlab.tools.sample import to_uint8

ROOT = Path(__file__).resolve().parents[2]


def fit(config: str, teacher: Path, save_dir: Path, *extra: str) -> Path:
    """A 2-step run of ``config`` on the tiny teacher (4 DDIM steps, guidance 3: not the teacher's 2)."""
    args = ["fit", "--config", str(ROOT / "configs" / config), "--model.init_args.teacher.checkpoint", str(teacher),
            "--model.init_args.sampling.steps", "4", "--model.init_args.sampling.cfg_scale", "3.0",
            "--data.init_args.batch_size", "4", "--data.init_args.image_size", "8", "--trainer.max_steps", "2",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir), *extra]  # fmt: skip
    assert main(args) == 0
    return next(save_dir.glob("*/version_0/checkpoints/final.ckpt"))


def sampled(argv: list[str], out: Path) -> np.ndarray:
    assert main([*argv, "--num", "3", "--out", str(out)]) == 0
    return np.load(out / "samples.npz")["arr_0"]


def printed_commands(output: str) -> list[list[str]]:
    return [shlex.split(command)[1:] for command in re.findall(r"`(ditlab sample [^`]*)`", output)]


def test_a_router_run_samples_through_its_plan_and_export_prints_working_commands(tmp_path, teacher_file, capsys):
    router = fit("l2c.yaml", teacher_file, tmp_path / "runs")
    capsys.readouterr()
    images = sampled(["sample", "--ckpt", str(router)], tmp_path / "run")
    said = capsys.readouterr().out
    assert f"from the teacher {teacher_file.resolve()} through its l2c router's plan" in said
    assert "ddim, 4 steps, cfg_scale 3 (the checkpoint's)" in said
    assert main(["export", "--ckpt", str(router), "--out", str(tmp_path / "plan.json")]) == 0
    commands = printed_commands(capsys.readouterr().out)
    assert len(commands) == 2 and "--cfg_scale=3.0" in commands[0]  # the teacher recorded guidance 2
    for index, command in enumerate(commands):
        assert np.array_equal(sampled(command, tmp_path / f"printed{index}"), images)
    labels = torch.arange(3) % 10
    assert np.array_equal(to_uint8(sample_checkpoint(router, labels)), images)  # the README's one call
    capsys.readouterr()
    plain = sampled(["sample", "--ckpt", str(teacher_file), "--cfg_scale", "3"], tmp_path / "teacher")
    said = capsys.readouterr().out  # the one line that says what was sampled, and how
    assert "sampling 3 image(s) from the network: ddim, 4 steps, cfg_scale 3 (the checkpoint's, except cfg_scale)" in said
    assert np.array_equal(to_uint8(sample_checkpoint(teacher_file, labels, cfg_scale=3.0)), plain)


def test_an_ilf_run_samples_through_its_feedback_block_and_exports_with_its_teacher(tmp_path, teacher_file, capsys):
    ilf = fit("ilf.yaml", teacher_file, tmp_path / "runs", "--model.init_args.feedback.source", "1",
              "--model.init_args.lr", "1e-2")  # fmt: skip
    capsys.readouterr()
    images = sampled(["sample", "--ckpt", str(ilf)], tmp_path / "run")
    assert "through its feedback block (block 1 fed back, a full call every 3)" in capsys.readouterr().out
    teacher = sampled(["sample", "--ckpt", str(teacher_file), "--cfg_scale", "3"], tmp_path / "teacher")
    assert not np.array_equal(images, teacher)  # feedback calls run blocks 2..3 only
    exported = tmp_path / "ilf_full.ckpt"
    assert main(["export", "--ckpt", str(ilf), "--out", str(exported)]) == 0
    (command,) = printed_commands(capsys.readouterr().out)
    teacher_file.rename(teacher_file.with_suffix(".moved"))  # the export needs no teacher file
    try:
        assert np.array_equal(sampled(command, tmp_path / "printed"), images)
    finally:
        teacher_file.with_suffix(".moved").rename(teacher_file)
    assert main(["sample", "--ckpt", str(ilf), "--num", "2", "--out", str(tmp_path / "x"), "--steps", "8"]) == 2
    assert "trained for ddim at 4 steps, not ddim at 8 steps" in capsys.readouterr().err
