"""configs/repa_teacher.yaml is configs/dit.yaml plus the REPA loss and nothing else, so a dicomp student of it
compares with the dicomp student of the plain teacher."""

from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def test_repa_teacher_differs_from_the_dit_teacher_only_by_the_alignment_loss():
    plain = yaml.safe_load((CONFIGS / "dit.yaml").read_text())
    aligned = yaml.safe_load((CONFIGS / "repa_teacher.yaml").read_text())
    assert aligned["model"]["class_path"] == "ditlab.methods.align.AlignModule"
    alignment_only = {"encoder", "feature", "attention"}
    plain_args, aligned_args = plain["model"]["init_args"], aligned["model"]["init_args"]
    assert set(aligned_args) - alignment_only == set(plain_args)
    assert {k: aligned_args[k] for k in plain_args} == plain_args
    assert aligned["data"] == plain["data"] and aligned["seed_everything"] == plain["seed_everything"]
    trainer = {k: v for k, v in aligned["trainer"].items() if k != "logger"}
    assert trainer == {k: v for k, v in plain["trainer"].items() if k != "logger"}
    assert aligned_args["feature"]["weight"] > 0 and aligned_args["encoder"]["name"] == "digits-vit"
