"""configs/dit_moe.yaml end to end (tiny): trains with the balance loss, reports total vs activated parameters,
reloads through ``load_network``; an MoE checkpoint given where a dense one is expected fails in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ditlab.analysis import scalar_series
from ditlab.checkpoint import read_checkpoint
from ditlab.cli import main
from ditlab.models.config import DiTConfig
from ditlab.models.loading import load_matching, load_network

ROOT = Path(__file__).resolve().parents[3]
TINY = [
    "--model.init_args.network.hidden_size", "32",
    "--model.init_args.network.depth", "2",
    "--model.init_args.network.num_heads", "2",
    "--model.init_args.sampling.steps", "2",
    "--model.init_args.warmup_steps", "0",
    "--data.init_args.image_size", "8",
    "--data.init_args.batch_size", "8",
    "--trainer.enable_progress_bar", "false",
    "--trainer.log_every_n_steps", "1",
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.val_check_interval", "4",
    "--trainer.max_steps", "4",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("dit_moe")
    assert main(["fit", "--config", str(ROOT / "configs" / "dit_moe.yaml"), *TINY,
                 "--trainer.logger.init_args.save_dir", str(runs)]) == 0  # fmt: skip
    return next(runs.glob("dit_moe/version_0"))


def test_dit_moe_trains_with_its_balance_loss_and_reports_activated_parameters(run):
    summary = json.loads((run / "summary.json").read_text())
    loss, balance = dict(scalar_series(run, "train/loss")), dict(scalar_series(run, "train/loss_balance"))
    diffusion = dict(scalar_series(run, "train/loss_diffusion"))
    assert sorted(balance) == [0, 1, 2, 3]
    for step in balance:
        assert loss[step] == pytest.approx(diffusion[step] + balance[step], rel=1e-5)
    assert sum(value for _, value in scalar_series(run, "moe/expert_0")) > 0
    assert 1 <= scalar_series(run, "moe/imbalance")[-1][1] <= 8 / 2
    # 8 experts of 3 x 32 x 128, 2 of them per token: total and activated parameters differ by 6 experts per block
    assert summary["parameters"] - summary["activated_parameters"] == 2 * 6 * 3 * 32 * 128
    network = load_network(run / "checkpoints" / "final.ckpt")
    assert summary["flops_per_image"] > 0 and network.config.mlp == "moe"


def test_checkpoint_reloads_with_its_config_and_samples_the_same(run):
    checkpoint = read_checkpoint(run / "checkpoints" / "final.ckpt")
    network = load_network(run / "checkpoints" / "final.ckpt")
    assert network.config.mlp_options["num_experts"] == 8 and network.config.mlp_options["shared_hidden"] == 84
    ema = {k[len("ema."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("ema.")}
    assert all(torch.equal(network.state_dict()[k], v) for k, v in ema.items())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([100.0, 900.0]), torch.tensor([3, 4])
    first, second = network(x, t, y), load_network(run / "checkpoints" / "final.ckpt")(x, t, y)
    assert torch.equal(first, second)


def test_an_moe_checkpoint_loaded_as_dense_is_one_line(run, tmp_path, capsys):
    checkpoint = read_checkpoint(run / "checkpoints" / "final.ckpt")
    dense = DiTConfig.from_dict({**checkpoint["ditlab"]["dit_config"], "mlp": "dense", "mlp_options": {}}).build()
    weights = {k[len("network."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("network.")}
    with pytest.raises(ValueError, match=r"does not fit this architecture: missing \['blocks.0.mlp.fc1.bias'") as error:
        load_matching(dense, weights, "the MoE checkpoint")
    assert "\n" not in str(error.value)

    # its bare weights (a state dict, or a .safetensors export without its .json) read as a public dense DiT file
    torch.save(weights, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"hold another MLP kind than DiT's dense one \(mlp.experts.down, ...\)") as error:
        load_network(tmp_path / "weights.pt")
    assert "\n" not in str(error.value)
    assert main(["sample", "--ckpt", str(tmp_path / "weights.pt"), "--num", "2", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
