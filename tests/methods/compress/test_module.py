"""DicompModule end to end on tiny networks: teacher cache, pruning, progressive stages, resume, reports."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from ditlab.checkpoint import network_from_checkpoint, read_checkpoint
from ditlab.cli import main
from ditlab.methods.teacher import TeacherConfig, build_from_recipe

ROOT = Path(__file__).resolve().parents[3]
TINY_TEACHER = [
    "--model.init_args.network.hidden_size", "32",
    "--model.init_args.network.depth", "6",
    "--model.init_args.network.num_heads", "2",
    "--model.init_args.sampling.steps", "4",
    "--data.init_args.batch_size", "16",
    "--trainer.enable_progress_bar", "false",
    "--trainer.max_steps", "30",
]  # fmt: skip


class DepthRecorder(L.Callback):
    """Student depth used by every optimiser step, keyed by the step's index."""

    depths: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        DepthRecorder.depths[trainer.global_step - 1] = pl_module.network.depth


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A 6-block digits teacher trained for 30 steps."""
    runs = tmp_path_factory.mktemp("teacher")
    assert main(["fit", "--config", str(ROOT / "configs" / "dit.yaml"), *TINY_TEACHER,
                 "--trainer.logger.init_args.save_dir", str(runs)]) == 0  # fmt: skip
    return next(runs.glob("dit/version_0/checkpoints/final.ckpt"))


def dicomp_config(tmp_path: Path, teacher: Path, at_steps: list[int], blocks: list[int], samples: int = 0) -> Path:
    """configs/dicomp.yaml shrunk to seconds: 6 -> 4 blocks, then the given progressive stages."""
    config = yaml.safe_load((ROOT / "configs" / "dicomp.yaml").read_text())
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"]["enable_progress_bar"] = False
    config["trainer"]["val_check_interval"] = 4
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ProgressiveDistillation"):
            callback["init_args"] = {"at_steps": at_steps, "blocks": blocks}
        if callback["class_path"].endswith("CompressionReport"):
            callback["init_args"].update(num_samples=samples, throughput_batch=8, steps=4)
        if callback["class_path"].endswith("SampleGrid"):
            callback["init_args"].update(every_n_steps=0, per_class=1)
    config["trainer"]["callbacks"].append({"class_path": f"{__name__}.DepthRecorder"})
    model = config["model"]["init_args"]
    model["teacher"]["checkpoint"] = str(teacher)
    model["prune"].update(num_blocks=4, calibration_images=64)
    model["warmup_steps"] = 0
    config["data"]["init_args"]["batch_size"] = 16
    path = tmp_path / "dicomp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, *args: str) -> dict:
    DepthRecorder.depths = {}
    assert main(["fit", "--config", str(config), *args]) == 0
    summaries = sorted(config.parent.glob("runs/dicomp/version_*/summary.json"))
    return json.loads(summaries[-1].read_text())


def test_progressive_stages_change_depth_exactly_at_their_steps(tmp_path, teacher_ckpt):
    summary = run(dicomp_config(tmp_path, teacher_ckpt, [3, 5], [3, 2], samples=20), "--trainer.max_steps", "7")
    assert DepthRecorder.depths == {0: 4, 1: 4, 2: 4, 3: 3, 4: 3, 5: 2, 6: 2}
    assert [stage["step"] for stage in summary["stages"]] == [3, 5]
    assert summary["student"]["blocks"] == 2 and summary["teacher"]["blocks"] == 6
    assert summary["student"]["parameters"] < 0.55 * summary["teacher"]["parameters"]
    assert summary["student"]["fid_features"] == "digits-classifier" and summary["student"]["fid"] > 0
    teacher_blocks = summary["stages"][-1]["teacher_blocks"]
    assert len(teacher_blocks) == 2 and set(teacher_blocks) <= set(summary["selection"]["keep"])
    stage_ckpts = sorted(p.name for p in tmp_path.glob("runs/dicomp/version_0/checkpoints/stage_*.ckpt"))
    assert stage_ckpts == ["stage_0_blocks_4.ckpt", "stage_1_blocks_3.ckpt"]


@pytest.mark.parametrize("stop_at", [2, 4])
def test_resume_before_or_after_a_stage_keeps_the_schedule(tmp_path, teacher_ckpt, stop_at):
    config = dicomp_config(tmp_path, teacher_ckpt, [3], [2])
    run(config, "--trainer.max_steps", str(stop_at))
    ckpt = tmp_path / "runs/dicomp/version_0/checkpoints/final.ckpt"
    assert read_checkpoint(ckpt)["global_step"] == stop_at
    run(config, "--trainer.max_steps", "6", "--ckpt_path", str(ckpt))
    assert DepthRecorder.depths == {step: 4 if step < 3 else 2 for step in range(stop_at, 6)}
    resumed = read_checkpoint(tmp_path / "runs/dicomp/version_1/checkpoints/final.ckpt")
    assert resumed["global_step"] == 6 and resumed["dicomp"]["keep"] and len(resumed["dicomp"]["keep"]) == 2
    assert network_from_checkpoint(resumed).depth == 2


def test_student_checkpoint_reloads_and_samples(tmp_path, teacher_ckpt):
    run(dicomp_config(tmp_path, teacher_ckpt, [2], [3]), "--trainer.max_steps", "3")
    ckpt = tmp_path / "runs/dicomp/version_0/checkpoints/final.ckpt"
    student = network_from_checkpoint(ckpt)
    teacher = network_from_checkpoint(teacher_ckpt)
    assert student.depth == 3 and teacher.depth == 6
    state = read_checkpoint(ckpt)["state_dict"]
    assert not any(key.startswith("teacher") for key in state), "the teacher must not be saved in checkpoints"
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(ckpt), "--num", "6", "--out", str(out), "--steps", "3"]) == 0
    assert len(list(out.glob("*.png"))) == 6


def test_distillation_losses_fall(tmp_path, teacher_ckpt):
    config = dicomp_config(tmp_path, teacher_ckpt, [1000], [1])
    summary = run(config, "--trainer.max_steps", "40", "--model.init_args.lr", "3e-3",
                  "--model.init_args.distill.task_weight", "0", "--trainer.log_every_n_steps", "1")  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tmp_path.glob("runs/dicomp/version_0")))).Reload()
    for tag in ("train/loss_kd_output", "train/loss_kd_feature"):
        values = [event.value for event in events.Scalars(tag)]
        assert sum(values[-5:]) / 5 < 0.7 * sum(values[:5]) / 5, (tag, values[:5], values[-5:])
    assert summary["metrics"]["train/loss"] is not None


def test_teacher_recipe_is_built_once_then_reused(tmp_path, capsys):
    recipe_args = [arg for arg in TINY_TEACHER if arg != "30"][:-1] + ["--trainer.max_steps", "2"]
    config = TeacherConfig(recipe=str(ROOT / "configs" / "dit.yaml"), recipe_args=recipe_args,
                           cache_dir=str(tmp_path / "cache"))  # fmt: skip
    first = build_from_recipe(config)
    assert first.is_file() and read_checkpoint(first)["global_step"] == 2
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    second = build_from_recipe(config)
    assert second == first and second.stat().st_mtime_ns == stamp
    assert "reusing" in capsys.readouterr().out
    other = build_from_recipe(TeacherConfig(recipe=config.recipe, recipe_args=[*recipe_args[:-1], "1"],
                                            cache_dir=config.cache_dir))  # fmt: skip
    assert other != first and read_checkpoint(other)["global_step"] == 1


def test_bad_teacher_and_depth_are_one_line(tmp_path, teacher_ckpt, capsys):
    config = dicomp_config(tmp_path, teacher_ckpt, [3], [2])
    assert main(["fit", "--config", str(config), "--model.init_args.teacher.checkpoint", str(tmp_path / "nope.ckpt")]) == 2
    assert "nope.ckpt does not exist" in capsys.readouterr().err
    assert main(["fit", "--config", str(config), "--model.init_args.prune.num_blocks", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exceeds the teacher's depth 6" in err[0]
    assert torch.__version__  # the suite imports torch here; keeps ruff from flagging the import
