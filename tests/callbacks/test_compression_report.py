"""End-of-run sampling: ``--eval.*`` reaches every measuring (and sampling) callback in a config's list, and the
compression report's teacher and student sampling and the final evaluation show progress lines in a log file."""

from __future__ import annotations

import json
import re
import types
from contextlib import redirect_stdout
from pathlib import Path

import torch
import yaml

from ditlab.cli import main
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.models.loading import network_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def quick_dicomp(tmp_path: Path, tiny_dit) -> Path:
    """configs/dicomp.yaml cut short (2 steps) on an untrained 4-block 16x16 teacher (4 -> 3 blocks, 2 at step 400),
    with an ``Evaluation`` added; both measuring callbacks keep their config's 500 images and 50 steps."""
    teacher = tmp_path / "teacher.ckpt"
    sampling = SamplingConfig(sampler="ddim", steps=4)
    torch.save(network_checkpoint(tiny_dit(input_size=16, depth=4), ObjectiveConfig(), sampling), teacher)
    config = yaml.safe_load((ROOT / "configs" / "dicomp.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(enable_progress_bar=False, num_sanity_val_steps=0, max_steps=2)
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("SampleGrid")]
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("CompressionReport"):
            callback["init_args"]["throughput_batch"] = 4
        if callback["class_path"].endswith("ProgressiveDistillation"):
            callback["init_args"]["blocks"] = [2]  # at step 400: never reached
    trainer["callbacks"].append({"class_path": "ditlab.callbacks.evaluation.Evaluation",
                                 "init_args": {"num_samples": 500, "steps": 50}})  # fmt: skip
    model = config["model"]["init_args"]
    model["teacher"]["checkpoint"] = str(teacher)
    model["prune"].update(num_blocks=3, calibration_images=32)
    config["data"]["init_args"]["batch_size"] = 8
    path = tmp_path / "dicomp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_eval_options_reach_the_report_and_evaluation_which_log_progress_to_a_file(tmp_path, tiny_dit):
    config, log = quick_dicomp(tmp_path, tiny_dit), tmp_path / "fit.log"
    with open(log, "w") as stream, redirect_stdout(stream):  # output to a file, as `ditlab fit ... > fit.log`
        assert main(["fit", "--config", str(config), "--eval.num_samples", "8", "--eval.steps", "2"]) == 0
    summary = json.loads(next(tmp_path.glob("runs/dicomp/version_0/summary.json")).read_text())
    assert summary["comparison_protocol"]["num_samples"] == 8 and summary["comparison_protocol"]["steps"] == 2
    assert summary["evaluation"]["num_samples"] == 8 and summary["evaluation"]["steps"] == 2
    assert summary["student"]["num_samples"] == 8 == summary["metrics"]["eval/num_samples"]
    text = log.read_text()
    assert "[dicomp] compression report: teacher and student, 4 images timed + 8 for FID each, 2 steps" in text
    for network in ("teacher", "student"):  # 4 timed + 8 measured images each
        assert re.search(rf"^\[dicomp\] compression report, {network}: done, 12 images in \d+s$", text, re.M), text
    assert re.search(r"^\[dicomp\] evaluation sampling at step 2: done, 8 images in \d+s$", text, re.M), text
    assert "warning: trainer.max_steps=2 ends the run before progressive stage 3 -> 2 blocks (from step 400)\n" in text


def test_eval_options_are_checked(capsys):
    assert main(["fit", "--config", str(ROOT / "configs" / "dit.yaml"), "--eval.num_samples", "2"]) == 2
    assert "eval.num_samples=2 is too few" in capsys.readouterr().err


def test_eval_options_set_every_measuring_and_sampling_callback():
    from ditlab.callbacks.compression_report import CompressionReport
    from ditlab.callbacks.eval_options import EvalOptions
    from ditlab.callbacks.evaluation import Evaluation
    from ditlab.callbacks.progressive import ProgressiveDistillation
    from ditlab.callbacks.samples import SampleGrid

    callbacks = [Evaluation(), CompressionReport(steps=50), SampleGrid(cfg_scale=2.0), ProgressiveDistillation([9], [1])]
    options = EvalOptions(num_samples=16, steps=3)
    options.setup(types.SimpleNamespace(callbacks=[*callbacks, options]), None, "fit")
    evaluation, report, grid, _ = callbacks
    assert evaluation.num_samples == report.num_samples == 16
    assert evaluation.overrides == report.overrides == {"steps": 3} and grid.overrides == {"steps": 3, "cfg_scale": 2.0}
    EvalOptions().setup(types.SimpleNamespace(callbacks=callbacks), None, "fit")  # the defaults change nothing
    assert report.num_samples == 16 and grid.overrides["steps"] == 3
