"""Interop: public DiT checkpoints, diffusers' DiTTransformer2DModel and DiTPipeline, ``ditlab convert``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
)

from ditlab.checkpoint import network_from_checkpoint, read_checkpoint
from ditlab.cli import main
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.sample import denoise
from ditlab.models.dit import DiT
from ditlab.models.interop import (
    from_diffusers,
    load_diffusers,
    load_dit_checkpoint,
    load_safetensors,
    save_safetensors,
    to_diffusers,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def noisy_dit(tiny_dit, perturb):
    """``noisy_dit(seed=0, **fields)``: a 4-channel DiT (width 64, 2 blocks of 4 heads, 10 classes) with noise
    on every trainable weight, so each converted tensor is checked by the outputs."""

    def build(seed: int = 0, **fields) -> DiT:
        fields = {"in_channels": 4, "hidden_size": 64, "depth": 2, "num_heads": 4, **fields}
        return perturb(tiny_dit(std=0.0, seed=seed, **fields), seed)

    return build


def inputs(dit: DiT, batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer timesteps including both ends (diffusers' convention) and, in large batches, the null class."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dit.in_channels, dit.input_size, dit.input_size, generator=generator)
    t = torch.tensor([1, 437, 999][:batch] + [500] * max(0, batch - 3))
    y = torch.arange(batch) % (dit.num_classes + 1)  # includes the null class when batch > num_classes
    return x, t, y


CONFIGS = [
    {"input_size": 8, "patch_size": 2, "learn_sigma": True, "depth": 3},
    {"input_size": 16, "patch_size": 4, "learn_sigma": False, "depth": 2},
    {"input_size": 16, "patch_size": 2, "learn_sigma": True, "depth": 1, "class_dropout_prob": 0.0},
]


@pytest.mark.parametrize("config", CONFIGS, ids=["p2-sigma-depth3", "p4-nosigma", "p2-nodropout-depth1"])
def test_diffusers_port_matches_our_dit(config, noisy_dit):
    dit = noisy_dit(**config)
    model = to_diffusers(dit)
    assert isinstance(model, DiTTransformer2DModel)
    assert model.config.num_layers == config["depth"] and model.out_channels == dit.out_channels
    x, t, y = inputs(dit)
    with torch.no_grad():
        ours, theirs = dit(x, t.float(), y), model(x, t, y).sample
    assert ours.abs().max() > 0.1  # random weights reach the output
    assert (ours - theirs).abs().max() <= 1e-5


def test_default_diffusers_timesteps_differ_so_the_shift_matters(noisy_dit):
    dit = noisy_dit()
    model = to_diffusers(dit)
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 1  # what diffusers hard-codes
    x, t, y = inputs(dit)
    with torch.no_grad():
        assert (dit(x, t.float(), y) - model(x, t, y).sample).abs().max() > 1e-3


@pytest.mark.parametrize("config", CONFIGS[:1] + CONFIGS[2:], ids=["default", "nodropout"])
def test_round_trip_ours_diffusers_ours_is_exact(config, noisy_dit):
    dit = noisy_dit(**config)
    back = from_diffusers(to_diffusers(dit))
    assert back.config == dit.config
    assert dit.state_dict().keys() == back.state_dict().keys()
    assert all(torch.equal(value, back.state_dict()[name]) for name, value in dit.state_dict().items())
    x, t, y = inputs(dit)
    with torch.no_grad():
        assert torch.equal(dit(x, t.float(), y), back(x, t.float(), y))


def test_from_diffusers_reproduces_a_native_diffusers_model_exactly(perturb):
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()  # fmt: skip
    perturb(model)
    with torch.no_grad():  # DiT shares one embedder: keep diffusers' per-block copies tied
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    dit = from_diffusers(model)
    assert dit.config.freq_shift == 1.0 and dit.config.mlp_norm_eps == 1e-5
    x, t, y = inputs(dit)
    with torch.no_grad():
        assert (dit(x, t.float(), y) - model(x, t, y).sample).abs().max() <= 1e-5
    # the same model converted back carries its settings, so the two diffusers models agree too
    again = to_diffusers(dit)
    with torch.no_grad():
        assert (again(x, t, y).sample - model(x, t, y).sample).abs().max() <= 1e-5


def test_from_diffusers_refuses_untied_embedder_copies(noisy_dit):
    model = to_diffusers(noisy_dit())
    with torch.no_grad():
        model.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1e-3)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.emb.*block 0") as error:
        from_diffusers(model)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("width", [{"head_dim": 8}, {"mlp_hidden": 128}], ids=["attention", "mlp"])
def test_to_diffusers_refuses_width_pruned_networks(width, noisy_dit):
    dit = noisy_dit(**width)  # attention 4 x 8 = 32 wide, or an MLP 128 wide, in a 64-wide DiT
    with pytest.raises(ValueError, match="block 0 .*width.*safetensors") as error:
        to_diffusers(dit)
    assert "\n" not in str(error.value)


def test_to_diffusers_refuses_query_key_norms(noisy_dit):
    with pytest.raises(ValueError, match="qk_norm.*safetensors") as error:
        to_diffusers(noisy_dit(qk_norm=True))
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------- public checkpoints
def test_public_layout_loads_with_inferred_architecture(tmp_path, noisy_dit):
    dit = noisy_dit(input_size=16, patch_size=4, hidden_size=384, depth=1, num_heads=6, in_channels=4)
    other = noisy_dit(
        seed=7, input_size=16, patch_size=4, hidden_size=384, depth=1, num_heads=6, in_channels=4
    )
    path = tmp_path / "DiT-S-4.pt"
    torch.save({"model": other.state_dict(), "ema": dit.state_dict(), "opt": {}}, path)
    loaded = load_dit_checkpoint(path, num_classes=10)
    assert loaded.config == dit.config  # heads 6 from the S preset, everything else from the tensors
    assert all(torch.equal(value, loaded.state_dict()[name]) for name, value in dit.state_dict().items())
    raw = load_dit_checkpoint({f"module.{k}": v for k, v in dit.state_dict().items()})
    assert raw.config.num_classes == 10 and raw.config.class_dropout_prob == 0.1


def test_width_pruned_checkpoint_infers_heads_and_mlp_width(noisy_dit):
    # pruning keeps the head size: DiT-S's 6 heads of 64 cut to 4, the MLP cut from 1536 to 1000
    dit = noisy_dit(
        input_size=8, patch_size=4, hidden_size=384, depth=2, num_heads=4, head_dim=64, mlp_hidden=1000
    )
    loaded = load_dit_checkpoint(dit.state_dict(), num_classes=10)
    assert loaded.config == dit.config and loaded.config.num_heads == 4
    x, t, y = inputs(dit)
    with torch.no_grad():
        assert torch.equal(dit(x, t.float(), y), loaded(x, t.float(), y))


@pytest.mark.parametrize("config", CONFIGS, ids=["p2-sigma-depth3", "p4-nosigma", "p2-nodropout-depth1"])
def test_inferred_architecture_for_small_widths(config, noisy_dit):
    dit = noisy_dit(**config)
    overrides = {"num_heads": 4, **({"class_dropout_prob": 0.0} if "class_dropout_prob" in config else {})}
    loaded = load_dit_checkpoint(dit.state_dict(), **overrides)
    assert loaded.config == dit.config
    x, t, y = inputs(dit)
    with torch.no_grad():
        assert torch.equal(dit(x, t.float(), y), loaded(x, t.float(), y))
    with pytest.raises(ValueError, match="num_heads"):
        load_dit_checkpoint(dit.state_dict())


def test_checkpoint_errors_are_one_line(tmp_path, noisy_dit):
    missing = tmp_path / "DiT-XL-2-256x256.pt"
    with pytest.raises(FileNotFoundError, match="dl.fbaipublicfiles.com/DiT/models") as error:
        load_dit_checkpoint(missing)
    assert str(missing) in str(error.value) and "\n" not in str(error.value)
    torch.save(noisy_dit().state_dict(), missing)
    missing.write_bytes(missing.read_bytes()[: missing.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as error:
        load_dit_checkpoint(missing)
    assert "\n" not in str(error.value)
    weights = noisy_dit().state_dict()
    weights["blocks.1.attn.proj.weight"] = weights["blocks.1.attn.proj.weight"][:, :32]
    with pytest.raises(ValueError, match=r"shape mismatches.*blocks\.1\.attn\.proj\.weight: \(64, 32\)"):
        load_dit_checkpoint(weights, num_heads=4)
    weights = {**noisy_dit().state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        load_dit_checkpoint(weights, num_heads=4)


def test_safetensors_export_rebuilds_from_its_json(tmp_path, noisy_dit):
    dit = noisy_dit(depth=3, learn_sigma=False)
    path = save_safetensors(dit, tmp_path / "dit.safetensors", {"note": "x"})
    assert json.loads(path.with_suffix(".json").read_text())["dit_config"] == dit.config.to_dict()
    loaded = load_safetensors(tmp_path)
    assert loaded.config == dit.config
    assert all(torch.equal(value, loaded.state_dict()[name]) for name, value in dit.state_dict().items())
    # a bare .safetensors also loads through the architecture inference
    assert load_dit_checkpoint(path, num_heads=4).config == dit.config


# ----------------------------------------------------------------------------------- DiTPipeline
def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16, 16, 16), norm_num_groups=8, layers_per_block=1,
                         latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4).eval()  # fmt: skip


@pytest.mark.parametrize("sampler, cfg_scale, learn_sigma", [("ddim", 3.0, True), ("ddpm", 1.0, False)])
def test_dit_pipeline_samples_what_our_sampler_samples(sampler, cfg_scale, learn_sigma, noisy_dit):
    # DiTPipeline's null class is hard-coded to 1000, so the model has 1000 classes
    dit = noisy_dit(num_classes=1000, learn_sigma=learn_sigma)
    objective = GaussianDiffusion(learn_sigma=learn_sigma)
    vae = tiny_vae()
    pipe = DiTPipeline(transformer=to_diffusers(dit), vae=vae, scheduler=objective.scheduler(sampler))
    pipe.set_progress_bar_config(disable=True)
    decoded: list[torch.Tensor] = []  # the latents DiTPipeline hands to the VAE, captured at its first layer
    vae.post_quant_conv.register_forward_pre_hook(lambda module, args: decoded.append(args[0].clone()))
    labels = [3, 999]
    torch.manual_seed(11)  # DDPM's step noise: both loops draw it from the global generator
    images = pipe(labels, guidance_scale=cfg_scale, generator=torch.Generator().manual_seed(5),
                  num_inference_steps=6, output_type="pt").images  # fmt: skip
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)
    latents = denoise(
        dit, objective, noise, torch.tensor(labels), steps=6, sampler=sampler, cfg_scale=cfg_scale
    )
    assert latents.abs().max() > 0.5
    torch.testing.assert_close(decoded[0], latents / vae.config.scaling_factor, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ours = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert ((ours > 0) & (ours < 1)).float().mean() > 0.5  # the comparison is not of clamped pixels
    torch.testing.assert_close(torch.as_tensor(images), ours, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- ditlab convert
@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A tiny configs/dit.yaml run fitted for 2 steps (EMA != network after them)."""
    runs = tmp_path_factory.mktemp("convert") / "runs"
    tiny = ["--model.init_args.network.hidden_size", "32", "--model.init_args.network.depth", "2",
            "--model.init_args.network.num_heads", "2", "--model.init_args.sampling.steps", "2", "--model.init_args.sampling.sampler", "ddim",
            "--data.init_args.batch_size", "16", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    args = ["fit", "--config", str(ROOT / "configs" / "dit.yaml"), *tiny, "--trainer.logger.init_args.save_dir",
            str(runs), "--trainer.max_steps", "2"]  # fmt: skip
    assert main(args) == 0
    return next(runs.rglob("last.ckpt"))


@pytest.mark.slow
def test_convert_exports_both_formats_that_reload_to_the_same_network(trained_checkpoint, tmp_path, capsys):
    ema = network_from_checkpoint(trained_checkpoint)
    raw = network_from_checkpoint(trained_checkpoint, use_ema=False)
    x, t, y = inputs(ema, batch=4)
    with torch.no_grad():
        expected = ema(x, t.float(), y)
        assert not torch.equal(expected, raw(x, t.float(), y))

    assert main(["convert", "--ckpt", str(trained_checkpoint), "--out", str(tmp_path / "st")]) == 0
    loaded = load_safetensors(tmp_path / "st")
    assert json.loads((tmp_path / "st" / "dit.json").read_text())["weights"] == "ema"
    with torch.no_grad():
        assert torch.equal(loaded(x, t.float(), y), expected)

    assert main(["convert", "--ckpt", str(trained_checkpoint), "--out", str(tmp_path / "hf"),
                 "--format", "diffusers"]) == 0  # fmt: skip
    transformer = load_diffusers(tmp_path / "hf")
    with torch.no_grad():
        assert (transformer(x, t, y).sample - expected).abs().max() <= 1e-5
    back = from_diffusers(transformer)
    assert all(torch.equal(value, back.state_dict()[name]) for name, value in ema.state_dict().items())
    # the folder's own pipeline (pipeline.py, diffusers code) loads a pixel-space run with no VAE and samples with the
    # run's DDIM and its null class (tests/tools/test_diffusers_pipeline.py compares it with ditlab sample)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.vae is None
    pipe.set_progress_bar_config(disable=True)
    images = pipe([1, 2], guidance_scale=2.0, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 16, 16)

    assert (
        main(["convert", "--ckpt", str(trained_checkpoint), "--out", str(tmp_path / "raw"), "--no-ema"]) == 0
    )
    with torch.no_grad():
        assert torch.equal(load_safetensors(tmp_path / "raw")(x, t.float(), y), raw(x, t.float(), y))


@pytest.mark.slow
def test_convert_errors_are_one_line(trained_checkpoint, tmp_path, capsys):
    assert main(["convert", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(["convert", "--ckpt", str(trained_checkpoint), "--out", str(tmp_path / "o"), "--format", "onnx"])
        == 2
    )
    assert "unknown export format 'onnx' (--format)" in capsys.readouterr().err
    checkpoint = read_checkpoint(trained_checkpoint)
    checkpoint["ditlab"]["objective"]["kind"] = "flow"
    torch.save(checkpoint, tmp_path / "flow.ckpt")
    assert main(["convert", "--ckpt", str(tmp_path / "flow.ckpt"), "--out", str(tmp_path / "o"),
                 "--format", "diffusers"]) == 2  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "gaussian" in error[0] and "safetensors" in error[0]


def test_ddpm_scheduler_of_the_pipeline_export_has_fixed_variance():
    from ditlab.tools.convert import pipeline_scheduler

    scheduler, gaps = pipeline_scheduler({"kind": "gaussian", "num_timesteps": 1000}, {"sampler": "ddpm"})
    assert "learned variance" in gaps
    assert isinstance(scheduler, DDPMScheduler) and scheduler.config.variance_type == "fixed_small"
