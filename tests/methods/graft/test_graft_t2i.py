"""Grafting and CLEAR on text-to-image networks: operators grafted into PixArt blocks' self-attention, CLEAR's local
attention on an MM-DiT's image tokens with its text tokens attended globally (the ``clear`` kind), self-graft =
plain, stage 1 and the stage-2 distillation on captioned batches. Tiny random networks, ``random-words`` text."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.graft import JointLocalAttention, graft_operator, parallel_pairs
from ditlab.methods.graft.module import GraftConfig, GraftDistillConfig, GraftModule
from ditlab.methods.graft.stage1 import Stage1Config
from ditlab.methods.teacher import TeacherConfig
from ditlab.models.budget import flops_per_image
from ditlab.models.config import DiTConfig
from ditlab.models.loading import network_checkpoint
from ditlab.models.text.prompts import encode_prompts

TEXT = {"encoder": "random-words", "encoder_options": {"context_length": 8}, "text_dim": 64, "text_length": 8}
NETWORKS = {
    "pixart": DiTConfig(input_size=16, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2,
                        block="pixart", condition="text", condition_options={**TEXT, "adaln": "single"}),
    "mmdit": DiTConfig(input_size=16, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2,
                       block="mmdit", qk_norm="rms", block_options={"context_pre_only": True}, condition="text",
                       condition_options={**TEXT, "pooled_dim": 64, "projection": "linear"}),
}  # fmt: skip
CAPTIONS = ["a red 3 left of a blue 7", "two green ones", "a small 5", "a big yellow 9 above a 2", "a 4 and a 6",
            "a white 8 on grey"]  # fmt: skip


def randomise(network: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every weight random (adaLN-Zero and the zero output layer would make a fresh network the zero map)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name != "pos_embed":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        for module in network.modules():
            if isinstance(module, torch.nn.RMSNorm):
                module.weight.add_(1.0)
    return network


def inputs(kind: str, count: int = 4, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]
    return (torch.randn(count, 3, 16, 16, generator=generator), torch.linspace(20, 980, count),
            encode_prompts(NETWORKS[kind], captions))  # fmt: skip


@pytest.mark.parametrize("kind", ["pixart", "mmdit"])
def test_self_graft_is_the_plain_network(kind):
    network = randomise(NETWORKS[kind].build()).eval()
    grafted = graft_operator(network, "full").eval()
    x, t, text = inputs(kind)
    with torch.no_grad():
        assert torch.equal(grafted(x, t, text), network(x, t, text))
    assert grafted.config == network.config


def test_clear_attends_text_globally_and_image_tokens_locally():
    """Text queries see every key; image queries see every text key and their disc of image keys (the reference
    is one masked softmax over [text; image]); every kernel agrees, pooled keys included."""
    operator = JointLocalAttention(64, radius=2.5)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5 + 64, 8, generator=generator) for _ in range(3))
    mask = operator.joint_mask(69, q.device)
    assert mask[:5].all() and mask[5:, :5].all() and not mask[5:, 5:].all()
    assert int(mask[5:, 5:].sum(1).max()) == 21  # the disc of radius 2.5: 21 grid points
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for kernel in ("gather", "dense"):
        operator.kernel = kernel
        torch.testing.assert_close(operator(q, k, v), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(operator.map(q, k) @ v, reference, atol=1e-6, rtol=0)
    assert torch.equal(operator(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:]), operator.forward(q[:, :, 5:], k[:, :, 5:],
                                                                                         v[:, :, 5:]))  # fmt: skip
    pooled = JointLocalAttention(64, radius=2.5, pool=2)
    outputs = []
    for kernel in ("gather", "dense"):
        pooled.kernel = kernel
        outputs.append(pooled(q, k, v))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=0)
    with torch.no_grad():  # the CUDA kernel's block mask, checked in eager mode on CPU (forward only there)
        for module, expected in ((operator, reference), (pooled, outputs[1])):
            module.kernel = "flex"
            torch.testing.assert_close(module(q, k, v), expected, atol=1e-5, rtol=0)
    # FLOPs: text rows over all 69 keys, image rows over 5 text keys + their disc + 16 pooled keys (+ pooling)
    pairs = int(operator.key_counts(64).sum())
    assert operator.macs(69, 2, 8) == 2 * (pairs + 64 * 5 + 5 * 69) * 2 * 8


def test_clear_with_a_disc_covering_the_grid_is_the_mmdit():
    network = randomise(NETWORKS["mmdit"].build()).eval()
    wide = graft_operator(network, "clear", {"radius": 12}).eval()  # 8x8 grid: every image key in every disc
    local = graft_operator(network, "clear", {"radius": 2}).eval()
    x, t, text = inputs("mmdit")
    with torch.no_grad():
        plain, out_wide, out_local = network(x, t, text), wide(x, t, text), local(x, t, text)
    torch.testing.assert_close(out_wide, plain, atol=1e-5, rtol=0)
    assert (out_local - plain).abs().max() > 1e-3
    # the joint attention's operator FLOPs fall (text length 8 from the config): the network's FLOPs count them
    assert flops_per_image(local) < flops_per_image(network) == flops_per_image(wide)


@pytest.mark.parametrize("kind, operator, options", [
    ("pixart", "local", {"radius": 2}), ("pixart", "window", {"window": 3}), ("pixart", "hyena", {}),
    ("mmdit", "local", {"radius": 2}), ("mmdit", "hyena", {}),
])  # fmt: skip
def test_what_grafts_into_which_text_block(kind, operator, options):
    network = randomise(NETWORKS[kind].build())
    if kind == "mmdit":
        with pytest.raises(ValueError, match=rf"the '{operator}' operator lays tokens out on the image grid.*graft "
                                             "'clear'") as error:  # fmt: skip
            graft_operator(network, operator, options)
        assert "\n" not in str(error.value)
        return
    grafted = graft_operator(network, operator, options, blocks=[0, 2]).eval()
    assert grafted.config.attention == operator and grafted.blocks[1].attn.operator_name == "full"
    x, t, text = inputs(kind)
    with torch.no_grad():
        assert torch.isfinite(grafted(x, t, text)).all()


def test_parallel_pairs_are_refused_on_text_blocks():
    with pytest.raises(ValueError, match="has 'pixart' blocks; pair the blocks of a sequential DiT") as error:
        parallel_pairs(NETWORKS["pixart"].build())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind, operator, options", [("pixart", "local", {"radius": 2}),
                                                     ("mmdit", "clear", {"radius": 2})])  # fmt: skip
def test_graft_module_stage1_and_distillation_on_captions(kind, operator, options, tmp_path):
    """Stage 1 regresses the grafted attention onto the teacher's (PixArt: self-attention; MM-DiT: CLEAR's joint
    attention on every block), then stage 2's distillation from the frozen teacher (output + attention outputs of
    the grafted blocks, CLEAR's terms; the random teacher's task loss is left out) falls, training attention only."""
    path = tmp_path / "teacher.ckpt"
    teacher = randomise(NETWORKS[kind].build(), seed=1)
    torch.save(network_checkpoint(teacher, ObjectiveConfig(), SamplingConfig(steps=3)), path)
    module = GraftModule(teacher=TeacherConfig(checkpoint=str(path)),
                         graft=GraftConfig(operator=operator, options=options, blocks="all"),
                         stage1=Stage1Config(steps=30, batch_size=8, lr=3e-3, calibration_images=4),
                         distill=GraftDistillConfig(task_weight=0.0, trainable="attention"), ema_decay=None,
                         lr=2e-3)  # fmt: skip
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1
    captions = CAPTIONS[:4]
    module.build_student(images, captions)
    stage1 = module.summary["graft"]["stage1"]
    assert sorted(stage1) == ["0", "1", "2", "3"]
    assert all(r["mse_after"] < r["mse_before"] for r in stage1.values()), stage1
    assert module.network.config.attention == operator
    report = module.summary["graft"]
    assert report["student"]["attention_flops_per_image"] < report["teacher"]["attention_flops_per_image"]
    trained = {name for name, p in module.network.named_parameters() if p.requires_grad}
    assert trained and all(".attn." in name for name in trained)
    assert (kind == "mmdit") == any(".attn.context_qkv." in name for name in trained)
    text = module.condition_input(captions)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        module.seed_training_draws(0)  # the same noise every step: the loss of one fixed batch
        terms = module.training_losses(images, text)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append({name: float(value) for name, value in terms.items()})
    print(f"{kind}/{operator}: stage 1 {stage1['0']}; stage 2 loss {losses[0]['loss']:.4f} -> {losses[-1]['loss']:.4f}, "
          f"attention KD {losses[0]['loss_kd_attention']:.4f} -> {losses[-1]['loss_kd_attention']:.4f}")
    assert losses[-1]["loss"] < losses[0]["loss"]
    assert 0 < losses[-1]["loss_kd_attention"] < losses[0]["loss_kd_attention"]
