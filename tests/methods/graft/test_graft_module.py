"""GraftModule end to end on a tiny teacher: configs/clear.yaml and configs/graft.yaml run, their checkpoints
are ordinary DiT checkpoints (reload, sample), and mistakes are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ditlab.checkpoint import network_from_checkpoint, read_checkpoint
from ditlab.cli import main

ROOT = Path(__file__).resolve().parents[3]
TINY_TEACHER = [
    "--model.init_args.network.hidden_size", "32",
    "--model.init_args.network.depth", "4",
    "--model.init_args.network.num_heads", "2",
    "--model.init_args.sampling.steps", "4",
    "--data.init_args.batch_size", "16",
    "--trainer.enable_progress_bar", "false",
    "--trainer.max_steps", "20",
]  # fmt: skip


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A 4-block digits teacher (4x4 token grid) trained for 20 steps."""
    runs = tmp_path_factory.mktemp("teacher")
    assert main(["fit", "--config", str(ROOT / "configs" / "dit.yaml"), *TINY_TEACHER,
                 "--trainer.logger.init_args.save_dir", str(runs)]) == 0  # fmt: skip
    return next(runs.glob("dit/version_0/checkpoints/final.ckpt"))


def shrunk(tmp_path: Path, name: str, teacher: Path, samples: int = 0) -> Path:
    """configs/<name>.yaml shrunk to seconds on the tiny teacher."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    config["trainer"].update(max_steps=4, val_check_interval=2, enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("CompressionReport"):
            callback["init_args"].update(num_samples=samples, throughput_batch=4, steps=3)
        if callback["class_path"].endswith("SampleGrid"):
            callback["init_args"].update(every_n_steps=0, per_class=1)
    model = config["model"]["init_args"]
    model["teacher"]["checkpoint"] = str(teacher)
    if "stage1" in model:
        model["stage1"].update(calibration_images=32, steps=min(model["stage1"].get("steps", 0), 5))
    config["data"]["init_args"]["batch_size"] = 16
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(("name", "args", "attention", "depth"), [
    ("clear", [], "local", 4),
    ("graft", [], "hyena", 4),
    ("graft", ["--model.init_args.graft.operator", "full", "--model.init_args.graft.options", "{}",
               "--model.init_args.graft.parallel", "true"], "full", 2),
])  # fmt: skip
def test_configs_run_and_checkpoints_reload_and_sample(tmp_path, teacher_ckpt, name, args, attention, depth):
    assert main(["fit", "--config", str(shrunk(tmp_path, name, teacher_ckpt)), *args]) == 0
    ckpt = next(tmp_path.glob(f"runs/{name}/version_0/checkpoints/final.ckpt"))
    student = network_from_checkpoint(ckpt)
    assert student.config.attention == attention and student.depth == depth
    assert not any(key.startswith("teacher") for key in read_checkpoint(ckpt)["state_dict"])
    summary = json.loads(next(tmp_path.glob(f"runs/{name}/version_0/summary.json")).read_text())
    assert summary["student"]["flops_per_image"] > 0 and "attention_flops_per_image" in summary["student"]
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(ckpt), "--num", "2", "--out", str(out), "--steps", "2"]) == 0
    assert len(list(out.glob("*.png"))) == 2


def test_clear_trains_only_attention_and_resumes(tmp_path, teacher_ckpt):
    config = shrunk(tmp_path, "clear", teacher_ckpt)
    assert main(["fit", "--config", str(config)]) == 0
    ckpt = next(tmp_path.glob("runs/clear/version_0/checkpoints/final.ckpt"))
    teacher, student = network_from_checkpoint(teacher_ckpt), network_from_checkpoint(ckpt)
    teacher_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if ".attn." not in key:
            torch.testing.assert_close(value, teacher_state[key], rtol=0, atol=0, msg=key)
    assert (student.blocks[0].attn.qkv.weight - teacher.blocks[0].attn.qkv.weight).abs().max() > 0
    assert main(["fit", "--config", str(config), "--trainer.max_steps", "6", "--ckpt_path", str(ckpt)]) == 0
    resumed = read_checkpoint(next(tmp_path.glob("runs/clear/version_1/checkpoints/final.ckpt")))
    assert resumed["global_step"] == 6


def test_bad_operator_is_one_line(tmp_path, teacher_ckpt, capsys):
    config = shrunk(tmp_path, "graft", teacher_ckpt)
    assert main(["fit", "--config", str(config), "--model.init_args.graft.operator", "sliding"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "unknown attention kind 'sliding'" in err[-1]
