"""The everyday CLI: progress lines in a log, outputs under --trainer.default_root_dir, config fragments both
ways, Lightning's notices filtered, `ditlab --help`, and bugs that keep their traceback."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ditlab.callbacks.monitor import run_state
from ditlab.cli import (
    COMMANDS,
    REPORT,
    TOOLS,
    QuietFilter,
    UsageError,
    build_cli,
    main,
    place_fragments,
    quiet_lightning,
)

ROOT = Path(__file__).resolve().parents[1]
DIT = str(ROOT / "configs" / "dit.yaml")


@pytest.fixture
def tiny(tiny_args: list[str]) -> list[str]:
    """The tiny network/data/trainer overrides of ``tiny_args``, without its config and its logger save_dir."""
    return tiny_args[2:-2]


@pytest.mark.slow
def test_fit_to_a_log_prints_step_lines_and_lands_under_default_root_dir(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in ./runs
    root = tmp_path / "elsewhere"
    assert main(["fit", "--config", DIT, *tiny, "--trainer.enable_progress_bar", "true", "--trainer.max_steps", "4",
                 "--trainer.log_every_n_steps", "2", "--trainer.val_check_interval", "4",
                 "--trainer.default_root_dir", str(root)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[dit] step")]
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"], out
    assert all(" loss " in line and "images/s" in line and "ETA" in line for line in lines)
    assert "[dit] validation done (val/loss" in out and "[dit] training done: step 4" in out
    run = root / "dit" / "version_0"
    assert (run / "summary.json").is_file() and (run / "checkpoints" / "final.ckpt").is_file()
    assert f"summary: {run / 'summary.json'}" in out
    assert not (tmp_path / "runs").exists()


def test_an_explicit_save_dir_wins_over_default_root_dir(tiny, tmp_path):
    args = ["--config", DIT, *tiny, "--trainer.default_root_dir", str(tmp_path / "root")]
    assert build_cli(args, run=False).trainer.logger.save_dir == str(tmp_path / "root")
    explicit = build_cli([*args, "--trainer.logger.init_args.save_dir", str(tmp_path / "mine")], run=False)
    assert explicit.trainer.logger.save_dir == str(tmp_path / "mine")


def test_run_state_names_the_stage_and_the_alignment_state():
    progressive = SimpleNamespace(schedule={10: 3}, applied=[10])
    dicomp = SimpleNamespace(network=SimpleNamespace(depth=3), shrink=None)
    assert run_state(SimpleNamespace(callbacks=[progressive]), dicomp) == "stage 2/2, 3 blocks"
    haste = SimpleNamespace(alignment_active=False, terminated_at=200)
    assert run_state(SimpleNamespace(callbacks=[]), haste) == "alignment off since step 200"
    assert run_state(SimpleNamespace(callbacks=[]), SimpleNamespace(network=None)) == ""


@pytest.mark.parametrize("flag, fragment, key, value", [
    ("--data", "configs/data/digits.yaml", "val_fraction", 0.1),
    ("--trainer", "configs/trainer/cpu.yaml", "precision", "32-true"),
    ("--config", "configs/trainer/cpu.yaml", "precision", "32-true"),
])  # fmt: skip
def test_fragments_work_as_their_group_and_as_config(flag, fragment, key, value, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", DIT, flag, str(ROOT / fragment), "--print_config"])
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    group = printed["data"]["init_args"] if "data" in fragment else printed["trainer"]
    assert group[key] == value


def test_a_fragment_in_the_wrong_place_is_one_line_naming_the_fix(tmp_path, capsys):
    with pytest.raises(UsageError, match=r"holds data options .* give it as --data"):
        place_fragments(["fit", "--trainer", str(ROOT / "configs/data/cifar10.yaml")])
    bare = tmp_path / "bare.yaml"
    bare.write_text("class_path: ditlab.data.digits.DigitsDataModule\ninit_args: {batch_size: 8}\n")
    assert place_fragments(["fit", f"--data={bare}"]) == ["fit", "--data", str(bare)]  # the group option reads it
    assert main(["fit", "--config", str(bare)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bare class fragment" in err and "--data FILE" in err


def test_lightning_advertisement_and_weights_only_notice_are_filtered(caplog, monkeypatch):
    # Lightning stops propagating to the root logger (where caplog listens) when it is first imported before the
    # root has a handler, which depends on which conftest files pytest loads first
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    quiet_lightning()
    try:
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger](https://pypi.org/project/litlogger/)")
        logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").info(
            "`weights_only` was not set, defaulting to `False`."
        )
        rank_zero_info("GPU available: False")
    finally:
        for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.trainer.connectors.checkpoint_connector"):
            target = logging.getLogger(name)
            target.filters = [f for f in target.filters if not isinstance(f, QuietFilter)]
    assert [record.getMessage() for record in caplog.records] == ["GPU available: False"]


def test_top_level_help_lists_every_command_in_one_line_each(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in [*TOOLS, "fit", "validate"]:
        assert sum(line.split()[:1] == [command] for line in out.splitlines()) == 1, command
    assert set(TOOLS) <= set(COMMANDS)


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(tiny, monkeypatch):
    def broken(self) -> None:
        raise KeyError("an injected bug")

    monkeypatch.setattr("ditlab.cli.DitlabCLI.before_instantiate_classes", broken)
    with pytest.raises(KeyError, match="an injected bug") as raised:
        main(["fit", "--config", DIT, *tiny])
    assert REPORT in raised.value.__notes__
