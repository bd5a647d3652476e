"""What a new user tripped over: abbreviated options silently taken for others, a misspelt key in a YAML file
reported without the file, no ``--version``."""

from __future__ import annotations

from pathlib import Path

from ditlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIT = str(ROOT / "configs" / "dit.yaml")


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_an_abbreviated_option_is_refused_not_taken_for_another(capsys, tmp_path):
    assert main(["fit", "--config", DIT, "--trainer.max_step", "1", "--trainer.default_root_dir", str(tmp_path)]) == 2
    assert "unknown option --trainer.max_step" in error_line(capsys)
    assert not list(tmp_path.iterdir())  # nothing ran
    assert main(["sample", "--ckpt", str(ROOT / "tests/data/legacy/dit.ckpt"), "--step", "3", "--out",
                 str(tmp_path / "s")]) == 2  # fmt: skip
    assert "unknown option --step" in error_line(capsys)


def test_a_misspelt_key_in_a_config_file_names_the_file_and_the_key(capsys, tmp_path):
    fragment = tmp_path / "mine.yaml"
    fragment.write_text("model:\n  init_args:\n    lrr: 0.1\n")
    assert main(["fit", "--config", DIT, "--config", str(fragment), "--trainer.max_steps", "1"]) == 2
    line = error_line(capsys)
    assert "'lrr' is not accepted" in line and f"(in {fragment}, at model.init_args.lrr)" in line


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ditlab {version('ditlab')}"
