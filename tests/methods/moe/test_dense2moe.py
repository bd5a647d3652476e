"""Dense2MoEModule end to end on a tiny teacher: carve, distil with the balance loss, Mixture-of-Blocks stage,
checkpoints that reload (and refuse to load as what they are not), resume, and the parameter accounting."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from ditlab.analysis import scalar_series
from ditlab.checkpoint import read_checkpoint
from ditlab.cli import main
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.compress.carve import CarveConfig, carve_network
from ditlab.methods.moe.blocks import MixtureOfBlocks
from ditlab.models.config import DiTConfig
from ditlab.models.loading import load_network

ROOT = Path(__file__).resolve().parents[3]
TINY = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10)


def save_teacher(path: Path, network) -> Path:
    """A ditlab checkpoint holding ``network`` as if a run had trained it (weights only; enough for a teacher)."""
    meta = {"dit_config": network.config.to_dict(), "objective": asdict(ObjectiveConfig()),
            "sampling": asdict(SamplingConfig(steps=3)), "vae": None, "latent_scale": 1.0}  # fmt: skip
    torch.save({"ditlab": meta, "state_dict": {f"network.{k}": v for k, v in network.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    dit = TINY.build()
    for block in dit.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.2)
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.2)
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.ckpt", dit)


def config_file(tmp_path: Path, teacher: Path, stage_at: int) -> Path:
    """configs/dense2moe.yaml shrunk to seconds: 4 experts of 28 + 16 shared units, MoB 1 of 2 blocks at ``stage_at``."""
    config = yaml.safe_load((ROOT / "configs" / "dense2moe.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(enable_progress_bar=False, val_check_interval=3, log_every_n_steps=1, num_sanity_val_steps=0)
    trainer["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    for callback in trainer["callbacks"]:
        name, init = callback["class_path"].rsplit(".", 1)[-1], callback["init_args"]
        init.update({"ProgressiveDistillation": {"at_steps": [stage_at], "blocks": [2]},
                     "ExpertLoad": {"every_n_steps": 1}, "SampleGrid": {"every_n_steps": 0, "per_class": 1},
                     "CompressionReport": {"num_samples": 0, "throughput_batch": 4, "steps": 2}}[name])  # fmt: skip
    model = config["model"]["init_args"]
    model["teacher"]["checkpoint"] = str(teacher)
    model["carve"].update(num_experts=4, shared_width=16, calibration_images=32)
    model["mixture"]["group_size"] = 2
    model["warmup_steps"] = 0
    config["data"]["init_args"].update(batch_size=8, image_size=8)
    path = tmp_path / "dense2moe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_carve_distil_then_mixture_of_blocks_with_accounting_and_reloads(tmp_path, teacher):
    config = config_file(tmp_path, teacher, stage_at=3)
    assert main(["fit", "--config", str(config), "--trainer.max_steps", "5"]) == 0
    run = next(tmp_path.glob("runs/dense2moe/version_0"))
    summary = json.loads((run / "summary.json").read_text())

    # the balance loss is in the loss and logged; expert load and block use reach TensorBoard
    series = {tag: dict(scalar_series(run, f"train/{tag}")) for tag in ("loss", "loss_balance", "loss_diffusion",
                                                                        "loss_vb", "loss_kd_output", "loss_kd_feature")}
    assert sorted(series["loss_balance"]) == [0, 1, 2, 3, 4] and dict(scalar_series(run, "train/skipped_steps"))[4] == 0
    for step, loss in series["loss"].items():  # every weight is 1: the loss is the sum of its logged terms
        assert loss == pytest.approx(sum(series[tag][step] for tag in series if tag != "loss"), rel=1e-5)
    assert all(0 < value < 0.01 * 4 * 4 / 2 for value in series["loss_balance"].values())  # < collapse on 4 layers
    assert len(scalar_series(run, "moe/imbalance")) == 5 and len(scalar_series(run, "moe/expert_3")) == 5
    assert [step for step, _ in scalar_series(run, "mob/block_0")] == [3, 4]  # the steps after the stage

    # accounting: carved FFNs activate 16 + 2 x 28 of 128 units; the block mixture then runs 2 of 4 blocks
    carving = summary["carving"]
    ffn = carving["student"]["ffn_activated_parameters"] / carving["teacher"]["ffn_activated_parameters"]
    assert ffn == pytest.approx((16 + 2 * 28) / 128, abs=0.02)
    student, teacher_report = summary["student"], summary["teacher"]
    assert student["blocks"] == 2 and teacher_report["blocks"] == 4
    assert student["parameters"] > teacher_report["parameters"] > student["activated_parameters"]
    assert summary["student_vs_teacher"]["ffn_activated_parameters_ratio"] == pytest.approx(ffn / 2, abs=0.01)
    assert summary["student_vs_teacher"]["flops_per_image_ratio"] < 0.5
    assert summary["activated_parameters"] == student["activated_parameters"]
    assert summary["flops_per_image"] == student["flops_per_image"]
    assert summary["mixture_of_blocks"]["active"] == 1 and len(summary["stages"]) == 1

    # checkpoints: before the stage an MoE DiT, after it the mixture, both read by the one loader
    carved = load_network(run / "checkpoints" / "stage_0_blocks_4.ckpt")
    assert carved.config.mlp == "moe" and carved.config.mlp_options["top_k"] == 2
    final = run / "checkpoints" / "final.ckpt"
    mixture = load_network(final)  # the mixture is a trunk kind: the one loader reads it like any other network
    assert isinstance(mixture.trunk, MixtureOfBlocks) and mixture.config.trunk_options["active"] == 1
    assert not any(k.startswith(("teacher", "_teacher")) for k in read_checkpoint(final)["state_dict"])
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10.0, 500, 900]), torch.tensor([1, 2, 3])
    assert torch.isfinite(mixture(x, t, y)).all()

    # resume in the Mixture-of-Blocks stage: the mixture is rebuilt from the checkpoint, the stage not re-applied
    assert main(["fit", "--config", str(config), "--trainer.max_steps", "7", "--ckpt_path", str(final)]) == 0
    resumed = read_checkpoint(tmp_path / "runs/dense2moe/version_1/checkpoints/final.ckpt")
    assert resumed["global_step"] == 7
    assert resumed["ditlab"]["dit_config"]["trunk_options"] == {"group_size": 2, "active": 1}
    state = read_checkpoint(final)["state_dict"]
    assert resumed["state_dict"].keys() == state.keys()


def test_an_moe_teacher_and_bad_carving_are_one_line_errors(tmp_path, teacher, capsys):
    config = config_file(tmp_path, teacher, stage_at=3)
    assert main(["fit", "--config", str(config), "--model.init_args.carve.num_experts", "5"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "carve.num_experts=5 does not divide the 112 routed units" in error

    moe = carve_network(load_network(teacher), CarveConfig(num_experts=4, shared_width=16, importance="magnitude",
                                                           assignment="contiguous", router_init="centroid"))  # fmt: skip
    moe_teacher = save_teacher(tmp_path / "moe.ckpt", moe)
    assert main(["fit", "--config", str(config), "--model.init_args.teacher.checkpoint", str(moe_teacher)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "Dense2MoE carves a dense MLP, but the teacher" in error and "'moe' MLP" in error
