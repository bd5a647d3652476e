"""AlignmentTermination: HASTE's stop step in a real fit, and resumes across it."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from ditlab.callbacks.alignment import AlignmentTermination
from ditlab.checkpoint import read_checkpoint
from ditlab.cli import main
from ditlab.methods.base import DiffusionModule
from ditlab.models.config import DiTConfig

ROOT = Path(__file__).resolve().parents[2]
STOP = 3


class StepRecorder(L.Callback):
    """What every optimiser step saw, keyed by the step's index."""

    steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        terms = pl_module.last_terms
        StepRecorder.steps[trainer.global_step - 1] = {
            "active": pl_module.alignment_active,
            "encoder_held": pl_module.target_loaded,
            "align_terms": sorted(name for name in terms if name.startswith("loss_align")),
            "pure_diffusion": bool(torch.equal(terms["loss"], terms["loss_diffusion"])),
            "loads": pl_module.target_loads,
        }


def haste_config(tmp_path: Path) -> Path:
    """configs/haste.yaml at tiny size (4 blocks, width 32), no sampling callbacks, stop at step 3."""
    config = yaml.safe_load((ROOT / "configs" / "haste.yaml").read_text())
    config["trainer"].update(enable_progress_bar=False, log_every_n_steps=1)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"]["callbacks"] = [
        {"class_path": "ditlab.callbacks.alignment.AlignmentTermination", "init_args": {"step": STOP}},
        {"class_path": f"{__name__}.StepRecorder"},
    ]
    model = config["model"]["init_args"]
    model["network"].update(hidden_size=32, depth=4, num_heads=4)
    model["feature"].update(blocks=[2], projector_hidden=64)
    model["attention"].update(blocks=[1, 2], encoder_blocks=[3, 4])
    model["warmup_steps"] = 0
    config["data"]["init_args"]["batch_size"] = 16
    path = tmp_path / "haste.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, *args: str) -> dict:
    StepRecorder.steps = {}
    assert main(["fit", "--config", str(config), *args]) == 0
    return dict(StepRecorder.steps)


def events(version: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(version), size_guidance={"tensors": 0, "scalars": 0}).Reload()


def markers(version: Path) -> int:
    accumulator = events(version)
    tags = accumulator.Tags().get("tensors", [])
    return sum(len(accumulator.Tensors(tag)) for tag in tags if tag.startswith("align/termination"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict]:
    """Six steps straight through, alignment off from step 3."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    steps = run(haste_config(tmp_path), "--trainer.max_steps", "6")
    return tmp_path / "runs/haste/version_0", steps


@pytest.mark.slow
def test_termination_in_a_fit(uninterrupted):
    version, steps = uninterrupted
    assert sorted(steps) == list(range(6))
    for step, seen in steps.items():
        on = step < STOP
        assert seen["active"] == on and seen["encoder_held"] == on and seen["pure_diffusion"] != on
        assert seen["align_terms"] == (
            ["loss_align", "loss_align_attention", "loss_align_feature"] if on else []
        )
        assert seen["loads"] == 1
    summary = json.loads((version / "summary.json").read_text())
    assert summary["alignment"]["terminated_at"] == STOP and summary["alignment"]["released_bytes"] > 0
    assert summary["metrics"]["train/loss"] == summary["metrics"]["train/loss_diffusion"]
    assert not any(name.startswith("train/loss_align") for name in summary["metrics"])
    accumulator = events(version)
    assert [e.value for e in accumulator.Scalars("align/active")] == [1, 1, 1, 0, 0, 0]
    for tag in ("train/loss_align_feature", "train/loss_align_attention", "train/loss_align"):
        assert [e.step for e in accumulator.Scalars(tag)] == [0, 1, 2], tag  # nothing logged after the stop
    assert [e.step for e in accumulator.Scalars("align/terminated")] == [STOP]
    assert markers(version) == 1
    checkpoint = read_checkpoint(version / "checkpoints/final.ckpt")
    assert checkpoint["align"]["terminated_at"] == STOP
    # the module is the one owner of the termination state: the callback checkpoints nothing of its own
    assert not any(k.startswith("AlignmentTermination") for k in checkpoint["callbacks"])
    assert {key.split(".")[0] for key in checkpoint["state_dict"]} == {"network", "ema", "heads"}


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [2, 5])  # interrupted before and after the stop step
def test_resume_across_termination_behaves_like_an_uninterrupted_run(tmp_path, uninterrupted, stop_at):
    _, straight = uninterrupted
    config = haste_config(tmp_path)
    first = run(config, "--trainer.max_steps", str(stop_at))
    ckpt = tmp_path / "runs/haste/version_0/checkpoints/final.ckpt"
    assert read_checkpoint(ckpt)["global_step"] == stop_at
    resumed = run(config, "--trainer.max_steps", "6", "--ckpt_path", str(ckpt))
    assert sorted(resumed) == list(range(stop_at, 6))
    for step, seen in {**first, **resumed}.items():
        expected = {key: value for key, value in straight[step].items() if key != "loads"}
        assert {key: value for key, value in seen.items() if key != "loads"} == expected, step
    if stop_at >= STOP:  # resumed past the stop: the encoder is never loaded again
        assert all(seen["loads"] == 0 and not seen["encoder_held"] for seen in resumed.values())
    else:
        assert all(seen["loads"] == 1 for seen in resumed.values())
    summary = json.loads((tmp_path / "runs/haste/version_1/summary.json").read_text())
    assert summary["alignment"]["terminated_at"] == STOP
    assert markers(tmp_path / "runs/haste/version_0") + markers(tmp_path / "runs/haste/version_1") == 1
    final = read_checkpoint(tmp_path / "runs/haste/version_1/checkpoints/final.ckpt")
    assert final["global_step"] == 6 and final["align"]["terminated_at"] == STOP


def test_bad_step_and_module_are_refused():
    with pytest.raises(ValueError, match="must be >= 0"):
        AlignmentTermination(step=-1)
    network = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                            num_classes=10)  # fmt: skip
    with pytest.raises(ValueError, match="needs an alignment module"):
        AlignmentTermination(step=3).setup(L.Trainer(logger=False), DiffusionModule(network=network), "fit")
