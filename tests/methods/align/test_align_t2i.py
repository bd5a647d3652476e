"""Alignment on text-conditioned training (PixArt and MM-DiT networks, captioned batches): REPA, HASTE and REG with
``encoder: scene-clip`` (here a tiny stand-in with the scene CLIP image tower's shapes: the scene CLIP is never
trained in tests), Self-Transcendence with the empty caption as its null condition. The aligned hidden states and
maps of an MM-DiT are its image part."""

from __future__ import annotations

import pytest
import torch

import ditlab.methods.align.encoder_align as encoder_align
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.align import (
    AlignModule,
    AttentionAlignConfig,
    CleanAlignConfig,
    EncoderConfig,
    FeatureAlignConfig,
    GuidedAlignConfig,
    PhaseOneTeacherConfig,
    REGModule,
    SelfTranscendenceModule,
)
from ditlab.methods.align.encoders import EncoderOutput, FrozenEncoder, scene_clip_info
from ditlab.methods.align.streams import image_attention, image_tokens
from ditlab.models.config import DiTConfig
from ditlab.models.loading import network_checkpoint
from ditlab.models.taps import run_blocks

FLOW = ObjectiveConfig(kind="flow", t_scale=1000.0)
TEXT = {"encoder": "random-words", "encoder_options": {"context_length": 8}, "text_dim": 64, "text_length": 8}
NETWORKS = {
    "pixart": DiTConfig(input_size=16, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2,
                        learn_sigma=False, block="pixart", condition="text",
                        condition_options={**TEXT, "adaln": "single"}),
    "mmdit": DiTConfig(input_size=16, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2,
                       learn_sigma=False, block="mmdit", qk_norm="rms", block_options={"context_pre_only": True},
                       condition="text", condition_options={**TEXT, "pooled_dim": 64, "projection": "linear"}),
}  # fmt: skip
CAPTIONS = ["a red 3 left of a blue 7", "two green ones", "a small 5", "a big yellow 9 above a 2", "a 4 and a 6",
            "a white 8 on grey", "a 1", "a black 0 below a 5"]  # fmt: skip
SCENE_CLIP = EncoderConfig(name="scene-clip")


class StandInSceneCLIP(FrozenEncoder):
    """A fixed random ViT-like encoder with the scene CLIP image tower's interface (RGB, 32x32, 8x8 patches, its
    width, heads and depth): patch features, a class token and per-block attention maps from fixed projections."""

    name = "scene-clip"
    channels = (3,)

    def __init__(self) -> None:
        super().__init__()
        self.info = scene_clip_info()
        generator = torch.Generator().manual_seed(7)
        width = self.info.feature_dim
        self.register_buffer("patch", torch.randn(3 * 16, width, generator=generator) / 48**0.5)
        self.register_buffer("qk", torch.randn(self.info.depth, 2, width, width, generator=generator) / width**0.5)
        self.seen: list[torch.Tensor] = []

    def encode(self, images: torch.Tensor, grid: int, attention: set[int]) -> EncoderOutput:
        self.seen.append(images)
        pixels = torch.nn.functional.interpolate(images.float(), size=(32, 32), mode="bilinear", align_corners=False)
        patches = pixels.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(len(images), 64, 48)
        tokens = torch.tanh(patches @ self.patch)
        heads, maps = self.info.num_heads, {}
        for index in attention:
            q, k = (tokens @ self.qk[index, j] for j in range(2))
            q, k = (x.reshape(len(x), 64, heads, -1).transpose(1, 2) for x in (q, k))
            maps[index] = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return EncoderOutput(tokens, maps, 8, class_token=tokens.mean(1))


@pytest.fixture
def stand_in(monkeypatch) -> StandInSceneCLIP:
    """``encoder: scene-clip`` loads the stand-in (the config path is the real one)."""
    encoder = StandInSceneCLIP()
    monkeypatch.setattr(encoder_align, "load_encoder", lambda name, **kwargs: encoder)
    return encoder


def batch(count: int = 8, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, 16, 16, generator=generator) * 2 - 1, CAPTIONS[:count]


def fit(module, images: torch.Tensor, captions: list[str], steps: int = 8, lr: float = 3e-3) -> list[dict]:
    """``steps`` optimiser steps on one captioned batch with the same draws each step (the loss of a fixed batch)."""
    text = module.condition_input(captions)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=lr)
    history = []
    for _ in range(steps):
        module.seed_training_draws(0)
        terms = module.training_losses(images, text)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        history.append({name: float(value) for name, value in terms.items()})
    return history


@pytest.mark.parametrize("kind", ["pixart", "mmdit"])
def test_repa_and_haste_align_the_image_part_and_their_losses_fall(kind, stand_in):
    torch.manual_seed(0)
    module = AlignModule(network=NETWORKS[kind], objective=FLOW, encoder=SCENE_CLIP, ema_decay=None,
                         feature=FeatureAlignConfig(blocks=[2], projector_hidden=48),
                         attention=AttentionAlignConfig(blocks=[1, 2], encoder_blocks=[3, 4], heads="first"))  # fmt: skip
    images, captions = batch()
    text = module.condition_input(captions)
    tapped = run_blocks(module.network, images, torch.rand(8), text, hidden=[1], attention=[0])
    length = 8 if kind == "mmdit" else 0  # an MM-DiT carries its 8 caption tokens before the 64 image tokens
    assert tapped.hidden[1].shape == (8, length + 64, 32) and tapped.attention[0].shape[-1] == length + 64
    assert image_tokens(module.network, tapped.hidden[1]).shape == (8, 64, 32)
    maps = image_attention(module.network, tapped.attention[0])
    assert maps.shape == (8, 2, 64, 64)
    torch.testing.assert_close(maps.sum(-1), torch.ones(8, 2, 64))
    if kind == "mmdit":  # the image-to-image block of the joint map, renormalised over the image keys
        block = tapped.attention[0][..., 8:, 8:]
        torch.testing.assert_close(maps, block / block.sum(-1, keepdim=True))
    history = fit(module, images, captions)
    first, last = history[0], history[-1]
    print(f"{kind}: HASTE loss {first['loss']:.4f} -> {last['loss']:.4f} (feature {first['loss_align_feature']:.4f} -> "
          f"{last['loss_align_feature']:.4f}, attention {first['loss_align_attention']:.4f} -> "
          f"{last['loss_align_attention']:.4f})")
    assert last["loss"] < first["loss"] and last["loss_align_feature"] < first["loss_align_feature"]
    assert last["loss_align_attention"] < first["loss_align_attention"]
    assert all(torch.equal(seen, images) for seen in stand_in.seen)  # the encoder saw the images, never captions


@pytest.mark.parametrize("kind", ["pixart", "mmdit"])
def test_a_captioned_batch_is_images_labels_captions(kind, stand_in):
    """Lightning's batch ``(images, labels, captions)``: the captions condition the network, the images are the
    encoder's pixels (on a class-conditional run a third element would be the clean images of latents)."""
    module = AlignModule(network=NETWORKS[kind], objective=FLOW, encoder=SCENE_CLIP, ema_decay=None,
                         feature=FeatureAlignConfig(blocks=[2], projector_hidden=48))  # fmt: skip
    images, captions = batch(4)
    loss = module.training_step((images, torch.zeros(4, dtype=torch.long), captions), 0)
    assert torch.isfinite(loss) and set(module.last_terms) >= {"loss_align_feature", "loss_diffusion"}
    assert len(stand_in.seen) == 1 and torch.equal(stand_in.seen[0], images)


@pytest.mark.parametrize("kind", ["pixart", "mmdit"])
def test_reg_denoises_its_class_token_on_text_networks(kind, stand_in):
    torch.manual_seed(0)
    module = REGModule(network=NETWORKS[kind], objective=FLOW, encoder=SCENE_CLIP, ema_decay=None,
                       feature=FeatureAlignConfig(blocks=[2], projector_hidden=48),
                       sampling=SamplingConfig(sampler="euler", steps=2, cfg_scale=2.0, batch_size=4))  # fmt: skip
    images, captions = batch()
    history = fit(module, images, captions, steps=10)
    first, last = history[0], history[-1]
    print(f"{kind}: REG loss {first['loss']:.4f} -> {last['loss']:.4f} (class token {first['loss_class_token']:.4f} -> "
          f"{last['loss_class_token']:.4f})")
    assert last["loss"] < first["loss"] and last["loss_class_token"] < first["loss_class_token"]
    # the class token is one token: the network's output for the patches has the image's shape; sampling
    # integrates latents and class token under the empty-caption guidance
    samples = module.sample(captions[:3], seed=0)
    assert samples.shape == (3, 3, 16, 16) and torch.isfinite(samples).all()


def test_reg_class_token_rides_the_text_stream_of_an_mmdit(stand_in):
    """[text; class; image]: the image part the head reads and the [class; patches] the projector aligns."""
    from ditlab.methods.align.reg import entangled_forward

    module = REGModule(network=NETWORKS["mmdit"], objective=FLOW, encoder=SCENE_CLIP, ema_decay=None,
                       feature=FeatureAlignConfig(blocks=[2], projector_hidden=48))  # fmt: skip
    images, captions = batch(2)
    text = module.condition_input(captions)
    seen = {}
    handle = module.network.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    output, velocity, hidden = entangled_forward(module.network, module.token_path, images, torch.randn(2, 64),
                                                 torch.tensor([300.0, 700.0]), text, hidden=[1])  # fmt: skip
    handle.remove()
    assert seen["x"].shape == (2, 8 + 1 + 64, 32) and hidden[1].shape == (2, 1 + 64, 32)
    assert output.shape == (2, 3, 16, 16) and velocity.shape == (2, 64)


@pytest.mark.parametrize("kind", ["pixart", "mmdit"])
def test_self_transcendence_guides_with_the_empty_caption(kind, tmp_path):
    phase1 = SelfTranscendenceModule(phase=1, network=NETWORKS[kind], objective=FLOW, ema_decay=None,
                                     clean=CleanAlignConfig(block=2, hidden=48, t_range=(0.0, 1.0)))  # fmt: skip
    images, captions = batch()
    history = fit(phase1, images, captions)
    assert history[-1]["loss_align_clean"] < history[0]["loss_align_clean"]
    path = tmp_path / "phase1.ckpt"
    checkpoint = network_checkpoint(phase1.network, FLOW, SamplingConfig())
    checkpoint["align"] = {"method": "self-transcendence", "phase": 1, "terminated_at": None}
    torch.save(checkpoint, path)
    phase2 = SelfTranscendenceModule(phase=2, network=NETWORKS[kind], objective=FLOW, ema_decay=None,
                                     teacher=PhaseOneTeacherConfig(checkpoint=str(path)),
                                     guided=GuidedAlignConfig(teacher_block=3, block=2, guidance=0.0, hidden=48,
                                                              t_range=(0.0, 1.0)))  # fmt: skip
    text = phase2.condition_input(captions)
    xt, t = torch.randn(8, 3, 16, 16), torch.linspace(100, 900, 8)
    features = phase2.guided_features(xt, t, text)  # w = 0: the teacher's features under the empty caption
    null = run_blocks(phase2.teacher, xt, t, text.null_rows(), stop_after=2).output
    assert features.shape == (8, 64, 32)
    torch.testing.assert_close(features, image_tokens(phase2.teacher, null))
    history = fit(phase2, images, captions)
    assert history[-1]["loss"] < history[0]["loss"] and history[0]["loss_align_guided"] > 0
