"""Reference settings of the alignment family: iREPA's projector and target normalisation, Self-Transcendence's
three-layer MLPs and its phase-1-only teacher, the DiT's ``qk_norm`` option, and encoders that refuse latents."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ditlab.data.digits import digits_tensors
from ditlab.diffusion.config import ObjectiveConfig
from ditlab.methods.align import (
    AlignModule,
    CleanAlignConfig,
    FeatureAlignConfig,
    GuidedAlignConfig,
    PhaseOneTeacherConfig,
    SelfTranscendenceModule,
)
from ditlab.methods.align.losses import ConvProjector, spatial_normalize
from ditlab.methods.base import DiffusionModule
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT

FLOW = ObjectiveConfig(kind="flow", t_scale=1000.0)
ROOT = Path(__file__).resolve().parents[3]


def tiny(**fields) -> DiTConfig:
    values = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10,
                  learn_sigma=False)  # fmt: skip
    return DiTConfig(**{**values, **fields})


def linears(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in module.modules())


# ----------------------------------------------------------------------------------------- iREPA
def test_conv_projector_mixes_only_grid_neighbours():
    torch.manual_seed(0)
    projector = ConvProjector(8, 5)
    tokens = torch.randn(2, 16, 8)  # a 4x4 grid
    moved = tokens.clone()
    moved[:, 0] += 1.0  # token (0, 0)
    delta = (projector(moved) - projector(tokens)).abs().sum(-1)[0].view(4, 4)
    assert (delta[:2, :2] > 0).all()  # itself and its 3x3 neighbourhood inside the grid
    assert torch.equal(delta[2:], torch.zeros(2, 4)) and torch.equal(delta[:, 2:], torch.zeros(4, 2))
    with pytest.raises(ValueError, match="square token grid"):
        projector(torch.randn(1, 15, 8))


def test_spatial_normalisation_removes_the_global_component():
    features = torch.randn(3, 16, 6) * 4 + torch.randn(3, 1, 6) * 10  # a large shared (global) part
    normalised = spatial_normalize(features, gamma=1.0)
    torch.testing.assert_close(normalised.mean(1), torch.zeros(3, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.std(1), torch.ones(3, 6), atol=1e-4, rtol=0)
    torch.testing.assert_close(spatial_normalize(features + torch.randn(3, 1, 6), 1.0), normalised, atol=1e-4, rtol=0)
    partial = spatial_normalize(features, gamma=0.0)  # gamma 0 only rescales
    torch.testing.assert_close(partial * features.std(1, keepdim=True), features, atol=1e-4, rtol=1e-4)


def test_irepa_options_build_a_conv_head_and_train():
    torch.manual_seed(0)
    module = AlignModule(network=tiny(), objective=FLOW, ema_decay=None,
                         feature=FeatureAlignConfig(blocks=[2], projector="conv", spatial_norm=1.0))  # fmt: skip
    assert isinstance(module.heads["block2"], ConvProjector)
    images, labels = digits_tensors(16)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        terms = module.training_losses(images[:16], labels[:16])
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss_align_feature"].item())
    assert losses[-1] < losses[0] - 0.1


# ----------------------------------------------------------------------------------------- Self-Transcendence
def test_self_transcendence_head_and_projector_are_three_layer_mlps():
    phase_one = SelfTranscendenceModule(phase=1, network=tiny(), objective=FLOW, clean=CleanAlignConfig(block=1, hidden=48))
    head = phase_one.heads["clean"]
    assert linears(head.mlp) == 3 and linears(head) == 4  # the MLP, then LayerNorm and the patch map
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [48, 48, 32]
    phase_two = SelfTranscendenceModule(phase=2, network=tiny(), objective=FLOW,
                                        guided=GuidedAlignConfig(teacher_block=3, block=2, hidden=48))  # fmt: skip
    assert linears(phase_two.heads["guided"]) == 3
    shallow = SelfTranscendenceModule(phase=2, network=tiny(), objective=FLOW,
                                      guided=GuidedAlignConfig(teacher_block=3, block=2, hidden=48, layers=2))  # fmt: skip
    assert linears(shallow.heads["guided"]) == 2


def saved(module, path: Path) -> Path:
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("writer", ["phase 2", "repa", "plain"])
def test_a_teacher_that_is_not_phase_one_is_refused_in_one_line(tmp_path, writer):
    torch.manual_seed(0)
    guided = GuidedAlignConfig(teacher_block=3, block=2, hidden=48)
    if writer == "phase 2":
        source = SelfTranscendenceModule(phase=2, network=tiny(), objective=FLOW, guided=guided)
    elif writer == "repa":
        source = AlignModule(network=tiny(), objective=FLOW, feature=FeatureAlignConfig(blocks=[2], projector_hidden=16))
    else:
        source = DiffusionModule(network=tiny(), objective=FLOW)
    path = saved(source, tmp_path / "teacher.ckpt")
    student = SelfTranscendenceModule(phase=2, network=tiny(), objective=FLOW, guided=guided,
                                      teacher=PhaseOneTeacherConfig(checkpoint=str(path)))  # fmt: skip
    with pytest.raises(ValueError) as error:
        student.teacher  # noqa: B018
    message = str(error.value)
    assert "\n" not in message and "not Self-Transcendence phase 1" in message and str(path) in message
    expected = {"phase 2": "Self-Transcendence phase 2", "repa": "'repa' alignment", "plain": "a plain diffusion run"}
    assert expected[writer] in message
    phase_one = SelfTranscendenceModule(phase=1, network=tiny(), objective=FLOW, clean=CleanAlignConfig(block=1, hidden=16))
    good = SelfTranscendenceModule(phase=2, network=tiny(), objective=FLOW, guided=guided,
                                   teacher=PhaseOneTeacherConfig(checkpoint=str(saved(phase_one, tmp_path / "p1.ckpt"))))
    assert good.teacher is not None  # fmt: skip


# ----------------------------------------------------------------------------------------- qk_norm
def test_qk_norm_off_adds_nothing_and_on_normalises_queries_and_keys(dit_inputs):
    torch.manual_seed(0)
    plain = DiT(tiny())
    assert not any("q_norm" in k or "k_norm" in k for k in plain.state_dict())  # public checkpoints load as before
    torch.manual_seed(0)
    normed = DiT(tiny(qk_norm=True))
    extra = set(normed.state_dict()) - set(plain.state_dict())
    assert extra == {f"blocks.{i}.attn.{n}_norm.{p}" for i in range(4) for n in "qk" for p in ("weight", "bias")}
    normed.load_state_dict(plain.state_dict(), strict=False)
    for block in (*plain.blocks, *normed.blocks):
        nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.2, generator=torch.Generator().manual_seed(3))
    nn.init.normal_(plain.final_layer.linear.weight, std=0.2, generator=torch.Generator().manual_seed(4))
    normed.final_layer.linear.weight.data.copy_(plain.final_layer.linear.weight)
    x, t, y = dit_inputs(plain)
    assert not torch.allclose(plain(x, t, y), normed(x, t, y))
    # queries scaled per head leave a q-normed network's output unchanged (it sees only their direction and spread)
    attention = normed.blocks[0].attn
    q, k, _ = attention.qkv(torch.randn(2, 16, 32)).reshape(2, 16, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    torch.testing.assert_close(attention.q_norm(3.0 * q), attention.q_norm(q), atol=1e-4, rtol=1e-4)
    assert DiTConfig.from_dict(tiny(qk_norm=True).to_dict()).qk_norm


def test_self_transcendence_config_turns_qk_norm_on():
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "self_transcendence.yaml").read_text())
    assert config["model"]["init_args"]["network"]["qk_norm"] is True
    for name in ("repa", "haste", "reg", "self_transcendence"):
        trainer = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["trainer"]
        assert trainer["gradient_clip_val"] == 1.0, name
