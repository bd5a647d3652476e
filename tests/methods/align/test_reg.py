"""REG: the encoder's class token entangled with the latent tokens, denoised with them, sampled jointly."""

from __future__ import annotations

import pytest
import torch

from ditlab.data.digits import digits_tensors
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.align import AlignModule, ClassTokenConfig, FeatureAlignConfig, REGModule
from ditlab.methods.align.reg import EntangledModel, entangled_forward
from ditlab.models.config import DiTConfig

FLOW = ObjectiveConfig(kind="flow", t_scale=1000.0)
NETWORK = DiTConfig(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10,
                    learn_sigma=False)  # fmt: skip


def reg(**overrides) -> REGModule:
    options = dict(network=NETWORK, objective=FLOW, ema_decay=None, sampling=SamplingConfig(sampler="euler", steps=3),
                   feature=FeatureAlignConfig(blocks=[2], projector_hidden=48))  # fmt: skip
    torch.manual_seed(0)
    return REGModule(**{**options, **overrides})


def batch(count: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits_tensors(16)
    return images[:count], labels[:count]


def test_the_class_token_is_one_more_token_and_starts_with_zero_velocity():
    module = reg()
    dit, path = module.network, module.token_path
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 2, 3])
    t, cls = torch.rand(3) * 1000, torch.randn(3, 64)
    output, velocity, hidden = entangled_forward(dit, path, x, cls, t, y, hidden=[1])
    assert hidden[1].shape == (3, 1 + 16, 32) and output.shape == (3, 1, 16, 16)
    assert torch.equal(velocity, torch.zeros(3, 64))  # zero-initialised output map, like the DiT's own head
    # the class token takes part in attention: the patch outputs depend on it once the gates are non-zero
    for block in dit.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.1)
    changed, _, _ = entangled_forward(dit, path, x, cls + 1.0, t, y)
    first, _, _ = entangled_forward(dit, path, x, cls, t, y)
    assert not torch.allclose(changed, first)


def test_packed_state_model_is_the_entangled_forward():
    module = reg()
    torch.nn.init.normal_(module.token_path.out.weight, std=0.1)
    model = EntangledModel(module.network, module.token_path).eval()
    state = torch.randn(2, 2, 16, 16)
    t, y = torch.rand(2) * 1000, torch.tensor([4, 5])
    packed = model(state, t, y)
    output, velocity, _ = entangled_forward(module.network, module.token_path, state[:, :1],
                                            state[:, 1].flatten(1)[:, :64], t, y)  # fmt: skip
    torch.testing.assert_close(packed[:, :1], output)
    torch.testing.assert_close(packed[:, 1].flatten(1)[:, :64], velocity)
    assert torch.equal(packed[:, 1].flatten(1)[:, 64:], torch.zeros(2, 256 - 64))


def test_reg_losses_fall_and_every_term_trains():
    module = reg()
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=2e-3)
    images, labels = batch()
    first = last = None
    for step in range(25):
        terms = module.training_losses(images, labels)
        optimizer.zero_grad()
        terms["loss"].backward()
        if step == 0:
            first = {k: v.item() for k, v in terms.items()}
            assert module.token_path.out.weight.grad.abs().sum() > 0  # the class velocity is trained
            assert module.heads["block2"][0].weight.grad.abs().sum() > 0
        optimizer.step()
        last = {k: v.item() for k, v in terms.items()}
    assert set(first) == {"loss", "loss_diffusion", "loss_class_token", "loss_align_feature", "loss_align"}
    assert last["loss_class_token"] < first["loss_class_token"]
    assert last["loss_align_feature"] < first["loss_align_feature"] - 0.1
    expected = last["loss_diffusion"] + 0.5 * last["loss_align_feature"] + 0.03 * last["loss_class_token"]
    assert last["loss"] == pytest.approx(expected, rel=1e-5)


def test_class_token_alignment_can_be_left_to_the_patches():
    aligned, patches_only = reg(), reg(class_token=ClassTokenConfig(align=False))
    images, labels = batch(4)
    # same weights, same draws: the projection term differs only by the class-token position
    patches_only.load_state_dict(aligned.state_dict())
    a = aligned.training_losses(images, labels)["loss_align_feature"]
    b = patches_only.training_losses(images, labels)["loss_align_feature"]
    assert not torch.allclose(a, b)


def test_sampling_integrates_the_class_token_with_the_ema_path(randomize_zero_init):
    module = reg(ema_decay=0.5)
    randomize_zero_init(module.ema)  # non-zero gates: the class token reaches the patch tokens
    module.token_path.out.weight.data.normal_(std=0.1)
    module.update_ema()  # token_ema moves half-way to the trained path
    torch.testing.assert_close(module.token_ema.out.weight, 0.5 * module.token_path.out.weight)
    images = module.sample(torch.arange(3), seed=1)
    again = module.sample(torch.arange(3), seed=1)
    assert images.shape == (3, 1, 16, 16) and torch.equal(images, again)
    assert images.min() >= -1 and images.max() <= 1
    module.token_ema.out.weight.data.zero_()
    assert not torch.equal(module.sample(torch.arange(3), seed=1), images)  # the EMA class path is what samples


def test_bad_reg_settings_are_one_line():
    with pytest.raises(ValueError, match="objective.kind=flow"):
        reg(objective=ObjectiveConfig(kind="gaussian"))
    with pytest.raises(ValueError, match="class_token.align false"):
        reg(feature=FeatureAlignConfig(blocks=[2], projector="conv"))
    module = reg(sampling=SamplingConfig(sampler="euler", steps=2, cache={"policy": "fora", "interval": 2}))
    with pytest.raises(ValueError, match="feature caching"):
        module.sample(torch.arange(2))


def test_reg_is_registered_with_the_align_family():
    module = reg()
    assert isinstance(module, AlignModule) and module.method == "reg" and not module.terminable
    assert module.alignment_state()["method"] == "reg"


@pytest.mark.slow
def test_reg_config_fits_validates_and_evaluates(tmp_path):
    import json
    from pathlib import Path

    import yaml

    from ditlab.cli import main

    root = Path(__file__).resolve().parents[3]
    config = yaml.safe_load((root / "configs" / "reg.yaml").read_text())
    config["trainer"].update(max_steps=4, val_check_interval=2, limit_val_batches=1,
                             logger={"init_args": {"save_dir": str(tmp_path / "runs"), "name": "reg"}})  # fmt: skip
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("Evaluation")]
    config["trainer"]["callbacks"][0]["init_args"].update(num_samples=10, steps=2)
    model = config["model"]["init_args"]
    model["network"].update(hidden_size=32, depth=4, num_heads=2)
    model["feature"].update(blocks=[2], projector_hidden=32)
    config["data"]["init_args"]["batch_size"] = 16
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path), "--trainer.enable_progress_bar", "false"]) == 0
    summary = json.loads((tmp_path / "runs/reg/version_0/summary.json").read_text())
    assert summary["alignment"]["method"] == "reg" and summary["metrics"]["eval/fid"] > 0
    assert summary["metrics"]["val/loss"] > 0 and summary["metrics"]["train/loss_class_token"] > 0


def test_tools_that_read_the_network_alone_refuse_a_reg_checkpoint(tmp_path):
    from ditlab.models.loading import network_from_checkpoint

    module = reg()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["ditlab"]["sampled_by"] == "ditlab.methods.align.reg.REGModule"
    with pytest.raises(ValueError, match=r"samples through more than a network \(its module .*REGModule.*`ditlab sample`"):
        network_from_checkpoint(checkpoint)
    plain = AlignModule(network=NETWORK, objective=FLOW, ema_decay=None, encoder=module.encoder_config,
                        feature=FeatureAlignConfig(blocks=[2]))  # fmt: skip
    checkpoint = {"state_dict": plain.state_dict()}
    plain.on_save_checkpoint(checkpoint)
    assert "sampled_by" not in checkpoint["ditlab"]
    assert network_from_checkpoint(checkpoint, use_ema=False).depth == 4


def test_ditlab_sample_samples_a_reg_checkpoint_as_its_module_does(tmp_path):
    from ditlab.checkpoint import sample_checkpoint

    module = reg()
    with torch.no_grad():
        module.token_path.out.weight.normal_(std=0.1)  # the class token's velocity matters to the images
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "reg.ckpt")
    labels = torch.arange(3)
    assert torch.equal(sample_checkpoint(tmp_path / "reg.ckpt", labels), module.sample(labels))
