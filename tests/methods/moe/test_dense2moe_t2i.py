"""Dense2MoE on text-to-image networks (the paper restructures FLUX.1): PixArt blocks carve their one FFN, MM-DiT
blocks the FFNs of both streams; carving with every expert on is the dense network; the module calibrates on
captions, distils, and enters the Mixture-of-Blocks stage. Tiny random networks, the ``random-words`` text encoder."""

from __future__ import annotations

import copy

import pytest
import torch

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.compress.carve import CarveConfig, block_ffns, calibrate_ffns, carve_network
from ditlab.methods.compress.dense2moe import BlockMixtureConfig, Dense2MoEModule, describe_network
from ditlab.methods.moe.blocks import MixtureOfBlocks, mixture_of_blocks
from ditlab.methods.moe.layer import MoEFeedForward
from ditlab.methods.teacher import TeacherConfig
from ditlab.models.components import pop_aux_losses
from ditlab.models.config import DiTConfig
from ditlab.models.loading import network_checkpoint
from ditlab.models.text.prompts import encode_prompts

TEXT = {"encoder": "random-words", "encoder_options": {"context_length": 8}, "text_dim": 64, "text_length": 8}
NETWORKS = {
    "pixart": DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2,
                        block="pixart", condition="text", condition_options={**TEXT, "adaln": "single"}),
    "mmdit": DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2,
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


def teacher_network(kind: str):
    return randomise(NETWORKS[kind].build(), seed=1).eval()


def batch(kind: str, count: int = 6, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]
    return (torch.randn(count, 3, 8, 8, generator=generator), torch.linspace(20, 980, count),
            encode_prompts(NETWORKS[kind], captions), captions)  # fmt: skip


@pytest.mark.parametrize("kind", ["pixart", "mmdit"])
@pytest.mark.parametrize("assignment", ["contiguous", "cluster"])
def test_carving_with_every_expert_on_is_the_dense_network(kind, assignment):
    teacher = teacher_network(kind)
    x, t, text, _ = batch(kind)
    calibration = calibrate_ffns(teacher, ObjectiveConfig().build(True), x, text, batch_size=4, seed=0)
    carved = carve_network(teacher, CarveConfig(num_experts=4, top_k=4, shared_width=16, assignment=assignment,
                                                gate="straight_through"), calibration)  # fmt: skip
    ffns = {(i, name) for i, block in enumerate(carved.blocks) for name in block_ffns(block)}
    if kind == "mmdit":  # both streams carved; SD3's context-pre-only last block has no text FFN
        assert ffns == {(i, "mlp") for i in range(4)} | {(i, "context_mlp") for i in range(3)}
        assert calibration.context.importance[3] is None and calibration.context.importance[0].shape == (128,)
    else:
        assert ffns == {(i, "mlp") for i in range(4)} and calibration.context is None
    tokens = torch.randn(2, 7, 32, dtype=torch.float64)
    for (index, name) in ffns:
        moe, dense = getattr(carved.blocks[index], name), getattr(teacher.blocks[index], name)
        assert isinstance(moe, MoEFeedForward)
        exact = copy.deepcopy(moe).double()(tokens)  # the partition of a sum: exact up to float64 rounding
        torch.testing.assert_close(exact, copy.deepcopy(dense).double()(tokens), atol=1e-12, rtol=0)
    with torch.no_grad():
        dense_out, carved_out = teacher(x, t, text), carved(x, t, text)
    print(f"{kind}/{assignment}: max |carved(all experts) - dense| = {(carved_out - dense_out).abs().max():.2e} "
          f"(outputs up to {dense_out.abs().max():.2f})")
    torch.testing.assert_close(carved_out, dense_out, atol=2e-5, rtol=0)
    # and the Mixture of Blocks running every block of each group is the carved network
    with torch.no_grad():
        torch.testing.assert_close(mixture_of_blocks(carved, 2, 2)(x, t, text), carved_out, atol=1e-6, rtol=0)


def test_text_stream_ffns_are_calibrated_on_the_text_tokens():
    teacher = teacher_network("mmdit")
    x, t, text, _ = batch("mmdit", count=8)
    calibration = calibrate_ffns(teacher, ObjectiveConfig().build(True), x, text, batch_size=4, max_tokens=64)
    context = calibration.context
    assert context.inputs[0].shape == (64, 32) and context.hidden[0].shape == (64, 128)
    assert not torch.equal(context.importance[0], calibration.importance[0])
    with torch.no_grad():  # what the text FFN of block 1 reads: the modulated text stream, not the image
        seen = {}
        handle = teacher.blocks[1].context_mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        teacher(x[:1], t[:1], text[:1])
        handle.remove()
    assert seen["x"].shape[1] == 8  # the 8 caption tokens
    carved = carve_network(teacher, CarveConfig(num_experts=4, top_k=1, shared_width=16, router_init="fit"),
                           calibration)  # fmt: skip
    moe = carved.blocks[1].context_mlp
    tokens = context.inputs[1]
    norms = torch.stack([moe.experts(e, tokens).norm(dim=-1) for e in range(4)], dim=1)
    agreement = ((tokens @ moe.router.t()).argmax(1) == norms.argmax(1)).float().mean()
    assert agreement > 0.4  # chance is 0.25: the text router was fitted on the text tokens


@pytest.mark.parametrize("kind", ["pixart", "mmdit"])
def test_module_carves_on_captions_distils_and_runs_a_mixture_of_blocks(kind, tmp_path):
    path = tmp_path / "teacher.ckpt"
    torch.save(network_checkpoint(teacher_network(kind), ObjectiveConfig(), SamplingConfig(steps=3)), path)
    module = Dense2MoEModule(teacher=TeacherConfig(checkpoint=str(path)),
                             carve=CarveConfig(num_experts=4, top_k=2, shared_width=16, calibration_images=8),
                             mixture=BlockMixtureConfig(group_size=2), ema_decay=None, lr=3e-3)  # fmt: skip
    x, _, _, captions = batch(kind, count=8)  # 8 images: the block criterion bins 8 noise levels
    images = x.clamp(-1, 1)
    module.build_student(images, captions)  # the captions are encoded by the teacher's text encoder
    student = module.network
    carved = {name for block in student.blocks for name in block_ffns(block)
              if isinstance(getattr(block, name), MoEFeedForward)}  # fmt: skip
    assert carved == ({"mlp", "context_mlp"} if kind == "mmdit" else {"mlp"})
    report = module.summary["carving"]
    assert report["student"]["ffn_activated_parameters"] < 0.75 * report["teacher"]["ffn_activated_parameters"]
    text = module.condition_input(captions)

    def train(steps: int) -> list[float]:
        optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=3e-3)
        losses = []
        for _ in range(steps):
            module.seed_training_draws(0)  # the same noise every step: the loss of one fixed batch
            terms = module.training_losses(images, text)
            loss = terms["loss"] + sum(pop_aux_losses(module.network).values())  # the experts' balance loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(terms["loss"]))
        return losses

    losses = train(6)
    print(f"{kind}: carved student, distillation loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0]
    starts = module.shrink(2)  # Mixture of Blocks: 1 of each group of 2 blocks per image
    assert isinstance(module.network.trunk, MixtureOfBlocks) and len(starts) == 2
    assert module.matched_layers() == [1, 3]
    losses = train(6)
    print(f"{kind}: Mixture of Blocks, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0]
    assert module.network.trunk.last_choice.sum(1).tolist() == [2.0] * len(images)  # one block per group ran
    assert describe_network(module.network)["blocks"] == 2
