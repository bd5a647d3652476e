"""The alignment family: REPA / HASTE (AlignModule), Self-Transcendence, and their encoders."""

from __future__ import annotations

import gc
import importlib.util
import json
import weakref
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

import ditlab.models.attention as attention_ops
from ditlab.checkpoint import network_from_checkpoint, read_checkpoint
from ditlab.cli import main
from ditlab.data.digits import DigitsDataModule, digits_tensors
from ditlab.diffusion import FlowMatching, Noised
from ditlab.diffusion.config import ObjectiveConfig
from ditlab.diffusion.gaussian import mean_flat
from ditlab.methods.align import (
    AlignModule,
    AttentionAlignConfig,
    CleanAlignConfig,
    FeatureAlignConfig,
    GuidedAlignConfig,
    PhaseOneTeacherConfig,
    SelfTranscendenceModule,
)
from ditlab.methods.align.encoders import DigitsViTRecipe, digits_vit, dinov2, load_encoder
from ditlab.methods.align.losses import attention_loss, guided, negative_cosine, velocity_to_x0
from ditlab.methods.base import DiffusionModule
from ditlab.models.config import DiTConfig
from ditlab.models.taps import run_blocks

ROOT = Path(__file__).resolve().parents[2]
FLOW = ObjectiveConfig(kind="flow", t_scale=1000.0)


def tiny(input_size: int = 16, patch_size: int = 4, num_heads: int = 2, depth: int = 4) -> DiTConfig:
    return DiTConfig(input_size=input_size, patch_size=patch_size, in_channels=1, hidden_size=32, depth=depth,
                         num_heads=num_heads, num_classes=10, learn_sigma=False)  # fmt: skip


def digits_batch(size: int = 16, count: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits_tensors(size)
    return images[:count], labels[:count]


def haste(num_heads: int = 4, **overrides) -> AlignModule:
    options = dict(network=tiny(num_heads=num_heads), objective=FLOW, ema_decay=None,
                   feature=FeatureAlignConfig(blocks=[2], projector_hidden=48),
                   attention=AttentionAlignConfig(blocks=[1, 2], encoder_blocks=[3, 4]))  # fmt: skip
    return AlignModule(**{**options, **overrides})


# ----------------------------------------------------------------------------------------- REPA
@pytest.mark.parametrize("blocks", [[1], [3], [1, 4]])
@pytest.mark.parametrize("input_size,patch_size", [(16, 4), (16, 2), (8, 4)])  # grids 4 (the encoder's), 8, 2
def test_projector_and_loss_shapes(blocks, input_size, patch_size):
    module = AlignModule(network=tiny(input_size, patch_size), objective=FLOW, ema_decay=None,
                         feature=FeatureAlignConfig(blocks=blocks, projector_hidden=48))  # fmt: skip
    grid = input_size // patch_size
    assert sorted(module.heads) == sorted(f"block{b}" for b in blocks)
    images, labels = digits_batch(input_size)
    target = module.encoder(images, grid)
    assert target.features.shape == (8, grid * grid, 64) and target.grid == grid
    tapped = run_blocks(module.network, images, torch.rand(8), labels, hidden=[b - 1 for b in blocks])
    for block in blocks:
        assert module.heads[f"block{block}"](tapped.hidden[block - 1]).shape == (8, grid * grid, 64)
    terms = module.training_losses(images, labels)
    assert set(terms) == {"loss", "loss_diffusion", "loss_align_feature", "loss_align"}
    assert all(value.shape == () and torch.isfinite(value) for value in terms.values())
    assert -1.0 <= terms["loss_align_feature"].item() <= 1.0
    torch.testing.assert_close(terms["loss"], terms["loss_diffusion"] + 0.5 * terms["loss_align_feature"])


def test_negative_cosine_bounds_and_scale_invariance():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 7, generator=generator)
    scales = torch.rand(2, 5, 1, generator=generator) + 0.1
    predicted = torch.randn(2, 5, 7, generator=generator)
    torch.testing.assert_close(negative_cosine(features * scales, features), torch.tensor(-1.0))
    torch.testing.assert_close(negative_cosine(-features, features), torch.tensor(1.0))
    torch.testing.assert_close(
        negative_cosine(predicted, features * scales), negative_cosine(predicted, features)
    )
    tiny_norm = features * 1e-4
    assert torch.isfinite(negative_cosine(tiny_norm.half(), tiny_norm.half()))
    with pytest.raises(ValueError, match="token grids"):
        negative_cosine(predicted, features[:, :4])


@pytest.mark.parametrize("term", ["loss_align_feature", "loss_align_attention"])
def test_alignment_reaches_only_blocks_up_to_the_aligned_one(term):
    module = AlignModule(network=tiny(), objective=FLOW, ema_decay=None,
                         feature=FeatureAlignConfig(blocks=[2], projector_hidden=48),
                         attention=AttentionAlignConfig(blocks=[2], encoder_blocks=[4], heads="mean"))  # fmt: skip
    terms = module.training_losses(*digits_batch())
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(terms[term], [module.get_parameter(n) for n in names], allow_unused=True)
    touched = {name for name, grad in zip(names, grads) if grad is not None and grad.abs().sum() > 0}
    assert any(name.startswith("network.blocks.0.") for name in touched)
    assert any(name.startswith("network.blocks.1.") for name in touched)
    assert any(name.startswith("heads.block2.") for name in touched) == (term == "loss_align_feature")
    assert not any(
        name.startswith(("network.blocks.2.", "network.blocks.3.", "network.final_layer")) for name in touched
    )


# ----------------------------------------------------------------------------------------- HASTE
def test_attention_loss_is_teacher_entropy_at_a_match_and_kl_is_zero():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, generator=generator)
    teacher = logits.softmax(-1)
    shifted = (logits + torch.randn(2, 4, 6, 1, generator=generator)).softmax(-1)  # per-row constant
    entropy = -(teacher * teacher.log()).sum(-1).mean()
    torch.testing.assert_close(attention_loss(shifted, teacher, "ce"), entropy)
    torch.testing.assert_close(attention_loss(shifted, teacher, "kl"), torch.tensor(0.0), atol=1e-6, rtol=0)
    other = torch.randn(2, 4, 6, 6, generator=generator).softmax(-1)
    assert attention_loss(other, teacher, "kl") > 0.01
    assert attention_loss(other, teacher, "ce") > entropy
    two_heads = other[:, :2]
    with pytest.raises(ValueError, match="heads=mean"):
        attention_loss(two_heads, teacher, "ce", "first")
    assert attention_loss(two_heads, teacher, "ce", "mean").shape == ()
    assert attention_loss(torch.cat([teacher, other], 1), teacher, "kl", "first") < 1e-6  # first H_T heads


def test_bad_layer_and_head_choices_fail_at_construction():
    with pytest.raises(ValueError, match="at least 4 heads.*heads=mean"):
        haste(num_heads=2)
    haste(num_heads=2, attention=AttentionAlignConfig(blocks=[1], encoder_blocks=[4], heads="mean"))
    with pytest.raises(ValueError, match=r"blocks \[5\] out of range for the DiT of depth 4"):
        AlignModule(network=tiny(), feature=FeatureAlignConfig(blocks=[5]))
    with pytest.raises(ValueError, match=r"out of range for encoder digits-vit of depth 4"):
        haste(attention=AttentionAlignConfig(blocks=[1], encoder_blocks=[9]))
    with pytest.raises(ValueError, match="pair up"):
        haste(attention=AttentionAlignConfig(blocks=[1, 2], encoder_blocks=[4]))
    with pytest.raises(ValueError, match="nothing to align"):
        AlignModule(network=tiny(), feature=None, attention=None)


def test_attention_maps_only_for_aligned_blocks_the_rest_fused(monkeypatch):
    module = haste()  # DiT head width 32 / 4 = 8; the digits ViT's 64 / 4 = 16
    calls: Counter = Counter()
    operator = attention_ops.FullAttention  # the full-attention operator both networks' Attention modules call
    fused, explicit = operator.__call__, operator.map

    def counting_fused(self, q, k, v):
        calls["fused", "dit" if q.shape[-1] == 8 else "encoder"] += 1
        return fused(self, q, k, v)

    def counting_map(self, q, k):
        calls["map", "dit" if q.shape[-1] == 8 else "encoder"] += 1
        return explicit(self, q, k)

    monkeypatch.setattr(operator, "__call__", counting_fused)
    monkeypatch.setattr(operator, "map", counting_map)
    terms = module.training_losses(*digits_batch())
    assert "loss_align_attention" in terms and terms["loss_align_attention"] > 0
    assert calls == {("map", "dit"): 2, ("fused", "dit"): 2, ("map", "encoder"): 2, ("fused", "encoder"): 2}
    calls.clear()
    module.terminate_alignment(1)
    module.training_losses(*digits_batch())
    assert calls == {("fused", "dit"): 4}


def test_encoder_stays_out_of_checkpoints_and_the_optimiser():
    module = haste()
    terms = module.training_losses(*digits_batch())
    encoder = module.encoder
    assert not any(key.startswith(("encoder", "_target")) for key in module.state_dict())
    assert {key.split(".")[0] for key in module.state_dict()} == {"network", "heads"}
    optimizer = module.configure_optimizers()["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {
        id(p) for p in [*module.network.parameters(), *module.heads.parameters()] if p.requires_grad
    }
    frozen = {name: value.clone() for name, value in encoder.state_dict().items()}
    heads = {name: value.clone() for name, value in module.heads.state_dict().items()}
    terms["loss"].backward()
    optimizer.step()
    assert all(torch.equal(value, frozen[name]) for name, value in encoder.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert any(not torch.equal(value, heads[name]) for name, value in module.heads.state_dict().items())


def test_termination_gives_exactly_the_diffusion_loss_and_frees_the_encoder():
    module = haste()
    images, labels = digits_batch()
    assert "loss_align_attention" in module.training_losses(images, labels)
    old = weakref.ref(module.encoder)
    assert module.target_loads == 1
    released = module.terminate_alignment(5)
    gc.collect()
    assert released > 0 and old() is None and module.encoder is None and not module.target_loaded
    module.seed_training_draws(3)
    terms = module.training_losses(images, labels)
    module.seed_training_draws(3)
    plain = DiffusionModule.training_losses(module, images, labels)
    assert set(terms) == {"loss", "loss_diffusion"}
    assert torch.equal(terms["loss"], terms["loss_diffusion"]) and torch.equal(terms["loss"], plain["loss"])
    assert module.target_loads == 1 and module.summary["alignment"]["terminated_at"] == 5
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["align"] == {"method": "haste", "terminated_at": 5, "encoder": "digits-vit"}
    resumed = haste()
    resumed.on_load_checkpoint(checkpoint)
    resumed.on_fit_start()
    assert resumed.encoder is None and resumed.target_loads == 0 and not resumed.alignment_active
    with pytest.raises(ValueError, match="'haste' alignment but the config trains 'repa'"):
        AlignModule(network=tiny(), feature=FeatureAlignConfig(blocks=[2])).on_load_checkpoint(checkpoint)


class TermRecorder(L.Callback):
    def __init__(self) -> None:
        self.terms: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.terms.append({name: value.item() for name, value in pl_module.last_terms.items()})


@pytest.mark.slow
def test_alignment_losses_fall_on_digits():
    L.seed_everything(0)
    module = haste(num_heads=2, lr=3e-3, warmup_steps=0,
                   attention=AttentionAlignConfig(blocks=[1, 2], encoder_blocks=[3, 4], loss="kl", heads="mean"))  # fmt: skip
    recorder = TermRecorder()
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[recorder])  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=32, image_size=16))
    curves = {name: np.array([terms[name] for terms in recorder.terms]) for name in recorder.terms[0]}
    print(
        {
            name: (round(values[:10].mean(), 4), round(values[-10:].mean(), 4))
            for name, values in curves.items()
        }
    )
    feature, attention = curves["loss_align_feature"], curves["loss_align_attention"]
    assert feature[-10:].mean() < feature[:10].mean() - 0.2  # cosine similarity up by at least 0.2
    assert attention[-10:].mean() < 0.7 * attention[:10].mean()  # KL to the encoder's maps down by 30 %


# ----------------------------------------------------------------------------------------- Self-Transcendence
def test_feature_guidance_is_affine_in_w():
    generator = torch.Generator().manual_seed(0)
    conditional, unconditional = torch.randn(2, 3, 4, 5, generator=generator)
    torch.testing.assert_close(guided(conditional, unconditional, 1.0), conditional)
    torch.testing.assert_close(guided(conditional, unconditional, 0.0), unconditional)
    step = guided(conditional, unconditional, 2.0) - guided(conditional, unconditional, 1.0)
    torch.testing.assert_close(guided(conditional, unconditional, 30.0), unconditional + 30.0 * step)


def test_velocity_head_loss_is_x0_loss_over_t_squared():
    generator = torch.Generator().manual_seed(0)
    objective = FlowMatching("linear")
    x0, noise, velocity = torch.randn(3, 4, 1, 4, 4, generator=generator)
    t = torch.tensor([0.2, 0.5, 0.9, 0.4])
    noised = Noised(xt=objective.add_noise(x0, t, noise), t=t, model_t=t, noise=noise)
    velocity_loss = mean_flat((velocity - objective.target(x0, noised)) ** 2)
    x0_loss = mean_flat((velocity_to_x0(objective, noised.xt, velocity, t) - x0) ** 2)
    torch.testing.assert_close(velocity_loss, x0_loss / t**2)
    gvp = FlowMatching("gvp")  # the conversion inverts any path: the true velocity gives back x0
    noised = Noised(xt=gvp.add_noise(x0, t, noise), t=t, model_t=t, noise=noise)
    torch.testing.assert_close(velocity_to_x0(gvp, noised.xt, gvp.target(x0, noised), t), x0)


def test_phase_one_head_learns_only_inside_the_time_window():
    module = SelfTranscendenceModule(phase=1, network=tiny(), objective=FLOW, ema_decay=None,
                                     clean=CleanAlignConfig(block=1, hidden=48, target="x0"))  # fmt: skip
    images, _ = digits_batch(count=4)
    objective, tokens = module.objective, torch.randn(4, 16, 32)
    for t, expect_gradient in (
        (torch.tensor([0.1, 0.2, 0.8, 0.95]), False),
        (torch.tensor([0.1, 0.5, 0.8, 0.9]), True),
    ):
        noise = torch.randn_like(images)
        noised = Noised(xt=objective.add_noise(images, t, noise), t=t, model_t=t, noise=noise)
        loss = module.clean_loss(tokens, images, noised)
        grads = torch.autograd.grad(loss, list(module.heads.parameters()))
        assert (sum(g.abs().sum() for g in grads) > 0) == expect_gradient
        assert (loss > 0) == expect_gradient


def st_config(tmp_path: Path, stop: int) -> Path:
    """configs/self_transcendence.yaml at tiny size, no sampling callbacks, termination at ``stop``."""
    config = yaml.safe_load((ROOT / "configs" / "self_transcendence.yaml").read_text())
    config["trainer"].update(enable_progress_bar=False, log_every_n_steps=1)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["trainer"]["callbacks"] = [
        {"class_path": "ditlab.callbacks.alignment.AlignmentTermination", "init_args": {"step": stop}}
    ]
    model = config["model"]["init_args"]
    model["network"].update(hidden_size=32, depth=4, num_heads=2)
    model["clean"].update(block=1, hidden=48)
    model["guided"].update(teacher_block=3, block=2)
    model["sampling"]["steps"] = 2
    config["data"]["init_args"]["batch_size"] = 16
    path = tmp_path / "st.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_self_transcendence_phase_one_then_phase_two(tmp_path):
    config = st_config(tmp_path, stop=3)
    phase_one = ["fit", "--config", str(config), "--model.init_args.phase", "1", "--trainer.max_steps", "5",
                 "--trainer.logger.init_args.name", "phase1"]  # fmt: skip
    assert main(phase_one) == 0  # the callback is idle in phase 1: no stop there
    ckpt = tmp_path / "runs/phase1/version_0/checkpoints/final.ckpt"
    checkpoint = read_checkpoint(ckpt)
    assert checkpoint["align"] == {"method": "self-transcendence", "terminated_at": None, "phase": 1}
    assert {key.split(".")[0] for key in checkpoint["state_dict"]} == {"network", "ema", "heads"}
    assert {key.split(".")[1] for key in checkpoint["state_dict"] if key.startswith("heads.")} == {"clean"}
    raw = network_from_checkpoint(checkpoint, use_ema=False)  # strict: no missing or unexpected network keys
    assert torch.equal(
        raw.blocks[0].attn.qkv.weight, checkpoint["state_dict"]["network.blocks.0.attn.qkv.weight"]
    )

    phase_two = ["fit", "--config", str(config), "--model.init_args.teacher.checkpoint", str(ckpt),
                 "--trainer.max_steps", "6", "--trainer.logger.init_args.name", "phase2"]  # fmt: skip
    assert main(phase_two) == 0
    summary = json.loads(next(tmp_path.glob("runs/phase2/version_0/summary.json")).read_text())
    assert summary["alignment"]["terminated_at"] == 3 and summary["alignment"]["teacher"] == str(ckpt)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs/phase2/version_0")).Reload()
    assert [e.step for e in events.Scalars("train/loss_align_guided")] == [0, 1, 2]
    assert [e.value for e in events.Scalars("align/active")] == [1, 1, 1, 0, 0, 0]
    assert read_checkpoint(tmp_path / "runs/phase2/version_0/checkpoints/final.ckpt")["align"]["phase"] == 2


def test_phase_two_teacher_is_frozen_and_outside_the_optimiser(tmp_path):
    teacher = SelfTranscendenceModule(phase=1, network=tiny(), objective=FLOW, ema_decay=None,
                                      clean=CleanAlignConfig(block=1, hidden=48))  # fmt: skip
    checkpoint = {"state_dict": teacher.state_dict()}
    teacher.on_save_checkpoint(checkpoint)
    path = tmp_path / "phase1.ckpt"
    torch.save(checkpoint, path)
    student = SelfTranscendenceModule(phase=2, network=tiny(), objective=FLOW, ema_decay=None,
                                      guided=GuidedAlignConfig(teacher_block=3, block=2, hidden=48, t_range=(0.0, 1.0)),
                                      teacher=PhaseOneTeacherConfig(checkpoint=str(path)))  # fmt: skip
    optimizer = student.configure_optimizers()["optimizer"]
    terms = student.training_losses(*digits_batch())
    assert (
        set(terms) == {"loss", "loss_diffusion", "loss_align_guided", "loss_align"}
        and terms["loss_align_guided"] > 0
    )
    frozen = {name: value.clone() for name, value in student.teacher.state_dict().items()}
    for name, value in frozen.items():
        assert torch.equal(value, teacher.network.state_dict()[name])  # the raw phase-1 weights
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in student.teacher.parameters()}
    terms["loss"].backward()
    optimizer.step()
    assert all(torch.equal(value, frozen[name]) for name, value in student.teacher.state_dict().items())
    assert all(p.grad is None for p in student.teacher.parameters())
    missing = SelfTranscendenceModule(phase=2, network=tiny(), objective=FLOW, guided=GuidedAlignConfig(teacher_block=3, block=2),
                                      teacher=PhaseOneTeacherConfig(checkpoint=str(tmp_path / "nope.ckpt")))  # fmt: skip
    with pytest.raises(
        FileNotFoundError, match="nope.ckpt does not exist; set model.init_args.teacher.checkpoint"
    ):
        missing.teacher  # noqa: B018


# ----------------------------------------------------------------------------------------- encoders
def test_digits_vit_is_deterministic_cached_and_not_the_fid_network(tmp_path):
    recipe = DigitsViTRecipe(epochs=1)
    first = digits_vit(tmp_path, recipe)
    cached = next(tmp_path.glob("digits-vit-*.pt"))
    stamp = cached.stat().st_mtime_ns
    second = digits_vit(tmp_path, recipe)
    assert cached.stat().st_mtime_ns == stamp
    retrained = digits_vit(tmp_path, recipe, retrain=True)
    for name, value in first.network.state_dict().items():
        assert torch.equal(value, second.network.state_dict()[name]) and torch.equal(
            value, retrained.network.state_dict()[name]
        )
    default = load_encoder("digits-vit")  # the recipe the configs use (cached once per machine)
    from ditlab.metrics.features import DigitsNet

    assert not isinstance(default.network, DigitsNet) and default.info.feature_dim == 64
    assert default.scores["probe_accuracy"] > 0.9 and default.train_seconds is not None
    images, _ = digits_batch()
    maps = default(images, 8, attention=[0, 3]).attention
    assert set(maps) == {0, 3} and maps[3].shape == (8, 4, 64, 64)
    torch.testing.assert_close(maps[3].sum(-1), torch.ones(8, 4, 64))


def test_dinov2_without_local_files_is_one_line(tmp_path, monkeypatch, capsys):
    for name in ("DITLAB_DINOV2_WEIGHTS", "DITLAB_DINOV2_REPO", "DITLAB_WEIGHTS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as error:
        load_encoder("dinov2-vitb14")
    message = str(error.value)
    assert "\n" not in message and "dinov2_vitb14_pretrain.pth" in message
    assert "model.init_args.encoder.weights" in message and "DITLAB_DINOV2_WEIGHTS" in message
    weights = tmp_path / "dinov2_vitb14_pretrain.pth"
    weights.write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match=r"hubconf.py does not exist; set model.init_args.encoder.repo"
    ):
        load_encoder("dinov2-vitb14", weights=str(weights))
    args = ["fit", "--config", str(ROOT / "configs" / "repa.yaml"), "--model.init_args.encoder.name", "dinov2-vitb14",
            "--model.init_args.network.hidden_size", "32", "--model.init_args.network.depth", "4",
            "--model.init_args.feature.projector_hidden", "16", "--trainer.max_steps", "1",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dinov2_vitb14_pretrain.pth not found" in err[0]


FAKE_HUBCONF = '''
"""A DINOv2-shaped toy for tests: same attribute layout as the hub models, explicit attention."""
import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj, self.last = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), None

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        self.last = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((self.last @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim), Attention(dim, heads), nn.Identity()
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TinyDino(nn.Module):
    def __init__(self, registers=0, dim=24, depth=12, heads=6):
        super().__init__()
        self.patch_size, self.num_register_tokens = 14, registers
        self.patch_embed = nn.Conv2d(3, dim, 14, 14)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.register_tokens = nn.Parameter(torch.randn(1, registers, dim)) if registers else None
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def prepare_tokens_with_masks(self, x, masks=None):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]], 1)
        return x


def dinov2_vits14_reg(pretrained=True):
    return TinyDino(registers=4)
'''


def test_dinov2_loads_from_a_local_hub_clone_and_reads_attention_of_its_blocks(tmp_path):
    repo = tmp_path / "dinov2"
    repo.mkdir()
    (repo / "hubconf.py").write_text(FAKE_HUBCONF)
    spec = importlib.util.spec_from_file_location("fake_dinov2_hubconf", repo / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    torch.manual_seed(0)
    reference = hub.dinov2_vits14_reg()
    torch.save(reference.state_dict(), tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    encoder = dinov2("dinov2-vits14_reg", weights=str(tmp_path), repo=str(repo))
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in encoder.model.state_dict().items())
    images, _ = digits_batch(count=2)
    output = encoder(images, 3, attention=[0, 11])
    assert output.features.shape == (2, 9, 24) and output.grid == 3
    for index in (0, 11):
        probs = encoder.model.blocks[index].attn.last[
            ..., 5:, 5:
        ]  # the block's own map, CLS + 4 registers dropped
        torch.testing.assert_close(output.attention[index], probs / probs.sum(-1, keepdim=True))
