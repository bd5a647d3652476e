"""TrainingMonitor: gradient norm, throughput and the resolved config in TensorBoard's HParams tab."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from ditlab.callbacks.monitor import flatten_config, gradient_norm
from ditlab.cli import main


def test_flatten_config_keeps_scalars_and_stringifies_the_rest():
    flat = flatten_config(
        {"model": {"init_args": {"lr": 1e-3, "betas": [0.9, 0.99], "vae": None}}, "seed": 0}
    )
    assert flat == {"model.init_args.lr": 1e-3, "model.init_args.betas": "[0.9, 0.99]",
                    "model.init_args.vae": "None", "seed": 0}  # fmt: skip


def test_gradient_norm_is_the_total_l2_norm_of_trainable_gradients():
    layers = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    layers[1].bias.requires_grad_(False)
    assert gradient_norm(layers.parameters()) is None
    layers(torch.randn(5, 4)).square().sum().backward()
    expected = torch.cat([p.grad.flatten() for p in layers.parameters() if p.requires_grad]).norm()
    assert torch.allclose(gradient_norm(layers.parameters()), expected)


@pytest.mark.slow
def test_fit_logs_grad_norm_throughput_and_hparams(tiny_args, tmp_path):
    assert main(["fit", *tiny_args, "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "2"]) == 0
    events = EventAccumulator(
        str(tmp_path / "runs" / "dit" / "version_0"), size_guidance={"tensors": 0}
    ).Reload()
    loss_steps = [event.step for event in events.Scalars("train/loss")]
    grad = events.Scalars("train/grad_norm")
    speed = events.Scalars("train/images_per_s")
    assert [event.step for event in grad] == loss_steps == [event.step for event in speed] == [1, 3, 5]
    assert all(event.value > 0 for event in grad + speed)
    assert all(event.value < 1e5 for event in speed)

    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.init_args.network.depth"].number_value == 2  # the resolved config, CLI overrides in
    assert hparams["trainer.max_steps"].number_value == 6
    experiment = events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    metrics = [
        info.name.tag
        for info in plugin_data_pb2.HParamsPluginData.FromString(experiment).experiment.metric_infos
    ]
    assert "val/loss" in metrics and "eval/fid" in metrics
