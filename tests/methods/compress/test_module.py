"""DicompModule end to end on tiny networks: teacher cache, pruning, progressive stages, resume, reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from ditlab.checkpoint import network_from_checkpoint, read_checkpoint
from ditlab.cli import main
from ditlab.methods.compress.module import DicompModule, DistillConfig, PhaseConfig, PruneConfig
from ditlab.methods.compress.ppcl import plugged, plugs, replaced_blocks
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


# --- PPCL, phases, width -------------------------------------------------------------------------------------


def method_config(tmp_path: Path, teacher: Path, name: str) -> tuple[Path, dict]:
    """configs/<name>.yaml shrunk to seconds (6 -> 3 blocks, no FID); returns the path and the config to edit."""
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    config["trainer"].update(enable_progress_bar=False, val_check_interval=4)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("CompressionReport"):
            callback["init_args"].update(num_samples=0, throughput_batch=4, steps=2)
        if callback["class_path"].endswith("SampleGrid"):
            callback["init_args"].update(every_n_steps=0, per_class=1)
    model = config["model"]["init_args"]
    model["teacher"]["checkpoint"] = str(teacher)
    model["prune"].update(num_blocks=3, calibration_images=64)
    model["warmup_steps"] = 0
    config["data"]["init_args"]["batch_size"] = 16
    return tmp_path / f"{name}.yaml", config


def test_ppcl_local_phase_trains_only_the_replacements_so_plugs_off_is_the_teacher(tmp_path, teacher_ckpt):
    path, config = method_config(tmp_path, teacher_ckpt, "ppcl")
    model = config["model"]["init_args"]
    model["prune"]["options"]["tau"] = 1e9  # no knee: the tiny teacher's plan surely has intervals
    model["phases"][0]["steps"] = 3
    config["trainer"]["max_steps"] = 3
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    ckpt = read_checkpoint(next(tmp_path.glob("runs/ppcl/version_0/checkpoints/final.ckpt")))
    segments = [tuple(s) for s in ckpt["dicomp"]["segments"]]
    summary = json.loads(next(tmp_path.glob("runs/ppcl/version_0/summary.json")).read_text())
    intervals = [(i["start"], i["end"]) for i in summary["selection"]["intervals"] if i["keep"] is not None]
    assert [segments[i] for i in replaced_blocks(segments)] == [span for span in intervals if span[1] > span[0]]
    assert replaced_blocks(segments), "the plan has at least one replacement"
    teacher, student = network_from_checkpoint(teacher_ckpt).eval(), network_from_checkpoint(ckpt).eval()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10, 200, 500, 900]), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        count = len(plugs(segments, teacher.depth))
        assert torch.equal(plugged(teacher, student, segments, [False] * count)(x, t, y), teacher(x, t, y))
    keep = ckpt["dicomp"]["keep"]
    for index in replaced_blocks(segments):  # the replacement moved away from its middle-block copy
        trained, copied = student.blocks[index].state_dict(), teacher.blocks[keep[index]].state_dict()
        assert any(not torch.equal(trained[key], copied[key]) for key in trained)


def test_phases_switch_losses_and_trainable_set_at_their_steps(teacher_ckpt):
    local = PhaseConfig(steps=2, task_weight=0.0, output_weight=0.0, feature_loss="direction", teacher_forced=True,
                        trainable="blocks")  # fmt: skip
    module = DicompModule(teacher=TeacherConfig(checkpoint=str(teacher_ckpt)), phases=[local],
                          distill=DistillConfig(), prune=PruneConfig(criterion="first", num_blocks=3))  # fmt: skip
    assert [module.phase(step)[0] for step in range(4)] == [0, 0, 1, 1]
    assert module.phase(1)[1] is local and module.phase(2)[1] is module.distill
    images, labels = torch.zeros(8, 1, 16, 16), torch.arange(8)
    module.build_student(images, labels)
    module.apply_phase(local)
    frozen = {name for name, p in module.network.named_parameters() if not p.requires_grad}
    assert frozen and all(not name.startswith("blocks.") for name in frozen)
    assert len(module.trainable_parameters()) == len(list(module.network.parameters())) - 1  # all but pos_embed
    module.apply_phase(PhaseConfig(steps=1, trainable="replaced"))  # keep [0, 1, 2]: block 2 stands for 2..5
    assert {name.split(".")[1] for name, p in module.network.named_parameters() if p.requires_grad} == {"2"}
    module.segments = [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(ValueError, match="no student block stands for more than one"):
        module.apply_phase(PhaseConfig(steps=1, trainable="replaced"))
    with pytest.raises(ValueError, match="at least 1"):
        DicompModule(phases=[PhaseConfig(steps=0)])


def test_analyze_and_training_keep_the_same_ppcl_blocks(tmp_path, teacher_ckpt):
    from ditlab.tools.analyze import calibration_images
    from ditlab.tools.analyze import main as analyze

    assert analyze(["--ckpt", str(teacher_ckpt), "--criteria", "ppcl", "--keep", "3", "--num-images", "64",
                    "--out", str(tmp_path)]) == 0  # fmt: skip
    report = json.loads((tmp_path / "analysis.json").read_text())["criteria"]["ppcl"]
    module = DicompModule(teacher=TeacherConfig(checkpoint=str(teacher_ckpt)),
                          prune=PruneConfig(criterion="ppcl", num_blocks=3))  # fmt: skip
    module.build_student(*calibration_images(module.teacher, 64, 0))
    assert module.keep == report["keep"] and module.summary["selection"]["keep"] == report["keep"]
    intervals = [(i["start"], i["end"]) for i in report["table"]["intervals"] if i["keep"] is not None]
    assert [module.segments[i] for i in replaced_blocks(module.segments)] == [s for s in intervals if s[1] > s[0]]


def test_taylor_width_pruning_builds_a_narrower_student(teacher_ckpt):
    from ditlab.tools.analyze import calibration_images

    module = DicompModule(teacher=TeacherConfig(checkpoint=str(teacher_ckpt)),
                          prune=PruneConfig(criterion="laptop", num_blocks=4, num_heads=1, mlp_hidden=16,
                                            width_score="taylor", calibration_images=32))  # fmt: skip
    module.build_student(*calibration_images(module.teacher, 32, 0))
    config = module.network.config
    assert (module.network.depth, config.num_heads, config.mlp_width) == (4, 1, 16)
    assert config.attention_head_dim == module.teacher.config.attention_head_dim


@pytest.mark.slow
def test_fsdp_resumes_a_checkpoint_saved_after_a_progressive_stage(tmp_path, teacher_ckpt):
    """The resumed run starts with a 4-block student, the checkpoint holds the 2-block one of the later stage."""
    fsdp = ["--config", str(ROOT / "configs" / "trainer" / "fsdp.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--trainer.strategy.init_args.param_dtype", "null",
            "--trainer.strategy.init_args.reduce_dtype", "null", "--data.init_args.batch_size", "8"]  # fmt: skip
    config = dicomp_config(tmp_path, teacher_ckpt, [2], [2])
    edited = yaml.safe_load(config.read_text())  # the subprocess cannot import this test module's recorder
    edited["trainer"]["callbacks"] = [c for c in edited["trainer"]["callbacks"] if "DepthRecorder" not in c["class_path"]]
    config.write_text(yaml.safe_dump(edited))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def fit(*args: str) -> None:
        command = [sys.executable, "-m", "ditlab", "fit", "--config", str(config), *fsdp, *args]
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    fit("--trainer.max_steps", "3")
    saved = tmp_path / "runs/dicomp/version_0/checkpoints/final.ckpt"
    fit("--trainer.max_steps", "5", "--ckpt_path", str(saved))
    resumed = read_checkpoint(tmp_path / "runs/dicomp/version_1/checkpoints/final.ckpt")
    assert resumed["global_step"] == 5 and len(resumed["dicomp"]["keep"]) == 2
    assert network_from_checkpoint(resumed).depth == 2


@pytest.mark.parametrize("name", ["amber", "tinyfusion", "dicomp_width"])
def test_method_configs_run(tmp_path, teacher_ckpt, name):
    path, config = method_config(tmp_path, teacher_ckpt, name)
    model = config["model"]["init_args"]
    if name == "tinyfusion":
        model["prune"]["options"]["steps"] = 2
    if name == "dicomp_width":
        model["prune"].update(num_blocks=6, num_heads=1, mlp_hidden=32)
    for phase in model.get("phases", []):
        phase["steps"] = 1
    config["trainer"]["max_steps"] = 2
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    summary = json.loads(next(tmp_path.glob(f"runs/{name}/version_0/summary.json")).read_text())
    assert summary["student"]["parameters"] < summary["teacher"]["parameters"]
    assert summary["selection"]["criterion"] == config["model"]["init_args"]["prune"]["criterion"]
