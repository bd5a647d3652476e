"""The ``ditlab`` command: bad input gives one line and exit 2; a tiny fit leaves summary, events, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ditlab.cli import build_cli, condense, main

ROOT = Path(__file__).resolve().parents[1]
DIT = str(ROOT / "configs" / "dit.yaml")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--trainer.max_stepz", "3"], "max_stepz"),
        (["--model.init_args.lr", "abc"], "model.lr"),
        (["--model.init_args.network.deptj", "3"], "deptj"),
        (["--model.init_args.objective.kind", "flw"], "gaussian"),
        (["--data.init_args.val_fraction", "2"], "val_fraction"),
        (["--data.init_args.batch_size", "5000"], "at most 1617"),
        (["--model.init_args.network.patch_size", "3"], "not divisible by patch_size=3"),
        (["--model.init_args.ema_decay", "1.5"], "ema_decay"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(args, expected, capsys, tmp_path):
    code = main(["fit", "--config", DIT, "--trainer.logger.init_args.save_dir", str(tmp_path), *args])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(error) == 1 and error[0].startswith("ditlab: error:")
    assert expected in error[0]


def test_missing_config_file_is_named(capsys):
    assert main(["fit", "--config", "configs/does_not_exist.yaml"]) == 2
    assert "does_not_exist.yaml" in capsys.readouterr().err


def test_condense_keeps_the_innermost_reason():
    raw = ('Parser key "model": Does not validate against any of the Union subtypes\nSubtypes: [A]\nErrors:\n'
           '  - Parser key "lr": Expected a <class \'float\'>. Got value: abc\n  - Expected a <class \'NoneType\'>')
    assert condense(raw) == "model.lr: Expected a float. Got value: abc"


def test_fit_help_lists_every_option(capsys):
    assert main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--trainer.max_steps", "--model.network.depth", "--model.objective.kind",
                   "--model.sampling.cfg_scale", "--data.batch_size", "--data.image_size"):  # fmt: skip
        assert option in text


@pytest.mark.slow
def test_tiny_fit_writes_summary_events_grid_and_checkpoint(tiny_args, tmp_path, capsys):
    assert main(["fit", *tiny_args, "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
                 "--trainer.log_every_n_steps", "1"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    summary_path = Path(printed.split("summary: ")[1].split()[0])
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == 6
    assert summary["parameters"] > 0 and summary["train_images_per_s"] > 0
    assert summary["config"]["model"]["init_args"]["network"]["depth"] == 2
    assert {"train/loss", "train/loss_diffusion", "train/loss_vb", "val/loss"} <= set(summary["metrics"])
    run = summary_path.parent
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert len(events.Scalars("train/loss")) >= 2
    assert [e.step for e in events.Images("samples/grid")] == [6]  # the config's grid every 250 steps, and at the end
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert Path(summary["last_sample_grid"]).is_file()


@pytest.mark.slow
def test_ctrl_c_leaves_a_checkpoint_that_resumes(tiny_args, tmp_path, interrupt_at):
    args = [*tiny_args, "--trainer.max_steps", "8"]
    cli = build_cli(args, run=False)
    cli.trainer.callbacks.append(interrupt_at(3))
    try:
        cli.trainer.fit(cli.model, cli.datamodule)
    except SystemExit:
        pass
    saved = Path(cli.trainer.log_dir) / "checkpoints" / "interrupted.ckpt"
    assert saved.is_file()
    assert torch.load(saved, weights_only=False)["global_step"] == 3
    assert main(["fit", *args, "--ckpt_path", str(saved)]) == 0
