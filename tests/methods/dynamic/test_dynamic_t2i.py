"""Dynamic compute on text-to-image networks: DyDiT's width and token routing (and Elastic-DiT, DC-DiT's chunking) on
PixArt blocks, the cross-attention counted in the FLOPs; all-on dynamic = plain; MM-DiT blocks refused in one line.
Tiny random networks, the ``random-words`` text encoder."""

from __future__ import annotations

import types

import lightning as L
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import ditlab.models.cross_attention as cross_attention_module
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.dynamic.export import dynamic_flops, export, plain_flops
from ditlab.methods.dynamic.module import DynamicConfig, DynamicModule
from ditlab.methods.teacher import TeacherConfig
from ditlab.models.attention import attention_map
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT
from ditlab.models.loading import network_checkpoint
from ditlab.models.text.prompts import encode_prompts

TEXT = {"encoder": "random-words", "encoder_options": {"context_length": 8}, "text_dim": 64, "text_length": 8}
PIXART = DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2, block="pixart",
                   condition="text", condition_options={**TEXT, "adaln": "single"})  # fmt: skip
MMDIT = DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2, block="mmdit",
                  condition="text", condition_options={**TEXT, "pooled_dim": 64, "projection": "linear"})  # fmt: skip
CAPTIONS = ["a red 3 left of a blue 7", "two green ones", "a small 5", "a big yellow 9 above a 2", "a 4 and a 6",
            "a white 8 on grey"]  # fmt: skip


def randomise(network: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Every weight random (PixArt's zero output layer would make a fresh network the zero map)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name != "pos_embed":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return network


def plain_pixart() -> DiT:
    return randomise(PIXART.build(), seed=1).eval()


def inputs(count: int = 4, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]
    return (torch.randn(count, 3, 8, 8, generator=generator), torch.linspace(20, 980, count).round(),
            encode_prompts(PIXART, captions))  # fmt: skip


def dynamic_of(plain: DiT, trunk: str, **options) -> DiT:
    network = DiT(plain.config.replace(trunk=trunk, trunk_options=options))
    missing, unexpected = network.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("trunk.") for key in missing)
    return network.eval()


def random_routers(network: DiT, seed: int = 0) -> None:
    """DyDiT width routers whose masks vary with t, token routers that drop some tokens."""
    generator = torch.Generator().manual_seed(seed)
    trunk = network.trunk
    with torch.no_grad():
        for router in [*trunk.head_routers, *trunk.group_routers]:
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * 0.3)
            router.bias.copy_(torch.randn(router.bias.shape, generator=generator) * 0.3 + 0.2)
        for router in trunk.token_routers:
            for layer in (router[0], router[2]):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.5)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.5 + 0.3)


@pytest.mark.parametrize("trunk, options", [("dydit", {}), ("dydit", {"token_input": "modulated"}),
                                            ("elastic", {}), ("chunking", {"router_bias": 30.0, "smoothing": 0.0})])  # fmt: skip
def test_all_on_dynamic_pixart_is_the_plain_pixart(trunk, options):
    plain = plain_pixart()
    dynamic = dynamic_of(plain, trunk, **options)
    x, t, text = inputs()
    with torch.no_grad():
        expected = plain(x, t, text)
        for form in ("sliced", "masked"):
            dynamic.trunk.set_form(form)
            assert torch.equal(dynamic(x, t, text), expected), form
        assert torch.equal(export(dynamic)(x, t, text), expected)
    assert torch.equal(dynamic.trunk.last.ratio, torch.ones(4))
    if trunk == "dydit":
        dynamic.train()  # an all-on straight-through mask is exactly 1; no caption drop-out forced
        with torch.no_grad():
            assert torch.equal(dynamic(x, t, text, force_drop_ids=torch.zeros(4, dtype=torch.long)), expected)


def test_dydit_masked_sliced_and_exported_pixart_agree_for_random_routers():
    plain = plain_pixart()
    dynamic = dynamic_of(plain, "dydit")
    random_routers(dynamic, seed=3)
    x, t, text = inputs(6)
    t[3:] = t[0]
    with torch.no_grad():
        dynamic.trunk.set_form("masked")
        masked = dynamic(x, t, text)
        details = dynamic.trunk.last.details
        assert (details["heads"] < 2).any() and (details["tokens"] < 1).any() and (details["groups"] < 2).any()
        dynamic.trunk.set_form("sliced")
        torch.testing.assert_close(dynamic(x, t, text), masked, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(export(dynamic)(x, t, text), masked, rtol=1e-5, atol=1e-5)


def counted_sdpa(q, k, v, attn_mask=None):
    """The cross-attention's mixing as explicit products, so ``FlopCounterMode`` counts it."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_dydit_flops_count_the_cross_attention_and_match_flop_counter_mode(monkeypatch):
    monkeypatch.setattr(cross_attention_module, "F", types.SimpleNamespace(scaled_dot_product_attention=counted_sdpa))
    plain = plain_pixart()
    dynamic = dynamic_of(plain, "dydit")
    for block in dynamic.blocks:  # the self-attention's mixing too (the fused CPU kernel hides its FLOPs)
        block.attn.operator = CountedFull(block.attn.operator)
    x, t, text = inputs(2)
    with torch.no_grad():
        dynamic(x, t, text)
    decisions = dynamic.trunk.last
    tokens, caption = 16, 8
    cross = sum(block.cross_attn.macs(tokens, caption) for block in dynamic.blocks)
    others = sum(block.attn.macs(tokens) + block.mlp.macs(tokens) for block in dynamic.blocks)
    assert cross > 0 and decisions.dense_macs == others + cross  # the denominator counts the cross-attention
    random_routers(dynamic, seed=1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dynamic(x, t, text)
    assert counter.get_total_flops() == int(dynamic_flops(dynamic).sum())
    assert (dynamic_flops(dynamic) < plain_flops(dynamic)).all() and (dynamic.trunk.last.ratio < 1).all()


class CountedFull:
    """Full attention as explicit matrix products (``FlopCounterMode`` counts ``q k^T`` and ``attn v``)."""

    name = "full"

    def __init__(self, operator) -> None:
        self.macs = operator.macs

    def __call__(self, q, k, v):
        return attention_map(q, k) @ v


@pytest.mark.parametrize("trunk", ["dydit", "elastic", "chunking"])
def test_mmdit_blocks_are_refused_in_one_line(trunk):
    with pytest.raises(ValueError, match=rf"the {trunk} trunk routes the heads, channels and image tokens of one "
                                         r"self-attention and one MLP per block \(dit, pixart\); 'mmdit' blocks carry "
                                         r"\[text; image\]") as error:  # fmt: skip
        MMDIT.replace(trunk=trunk).build()
    assert "\n" not in str(error.value)


class Captioned(torch.utils.data.Dataset):
    """Images with labels and captions: the ``(images, labels, captions)`` batches of the digit scenes."""

    def __init__(self, count: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(count, 3, 8, 8, generator=generator) * 2 - 1
        self.captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(count)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], 0, self.captions[index]


def test_dydit_training_on_captioned_batches_pulls_the_flops_ratio_to_its_target(tmp_path):
    path = tmp_path / "teacher.ckpt"
    torch.save(network_checkpoint(randomise(PIXART.build(), seed=1, std=0.05), ObjectiveConfig(),
                                  SamplingConfig(steps=3)), path)  # fmt: skip
    L.seed_everything(0)
    module = DynamicModule(teacher=TeacherConfig(checkpoint=str(path)), ema_decay=None, lr=1e-3,
                           dynamic=DynamicConfig(trunk="dydit", flops_target=0.5, target_hold_steps=2,
                                                 target_warmup_steps=4, complete_model_steps=10,
                                                 router_lr_scale=30.0,
                                                 trunk_options={"width_bias": 2.0, "token_bias": 4.0}))  # fmt: skip
    records = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            records.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, callbacks=[Record()],
                        enable_model_summary=False, gradient_clip_val=1.0)  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(Captioned(), batch_size=16, shuffle=True))
    first, last = records[0], records[-1]
    print(f"pixart dydit: FLOPs ratio {first['train/flops_ratio']:.3f} -> {last['train/flops_ratio']:.3f} (target "
          f"{last['train/flops_target']}), diffusion loss {first['train/loss_diffusion']:.4f} -> "
          f"{last['train/loss_diffusion']:.4f}")
    assert first["train/flops_target"] == 1.0 and last["train/flops_target"] == 0.5
    ratios = [r["train/flops_ratio"] for r in records]
    losses = [r["train/loss_diffusion"] for r in records]
    assert sum(ratios[-5:]) / 5 < sum(ratios[:5]) / 5 - 0.1  # heads, groups and tokens of PixArt blocks switched off
    assert sum(losses[-5:]) < sum(losses[:5])  # while the diffusion loss falls
    assert all(torch.isfinite(torch.tensor(list(r.values()))).all() for r in records)
