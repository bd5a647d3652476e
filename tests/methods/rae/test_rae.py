"""RAE: the decoder learns, latents round-trip, the time shift is RAE's, a DiT trains in the latent space, ``ditlab
encode --encoder`` writes latents the latent datamodule reads, the DDT head runs, and missing weights are one line."""

from __future__ import annotations

import math

import pytest
import torch

from ditlab.diffusion.flow import FlowMatching
from ditlab.diffusion.grids import flow_grid
from ditlab.methods.rae import load_rae
from ditlab.methods.rae.autoencoder import DecoderShape
from ditlab.methods.rae.shift import ShiftedFlowMatching, dimension_shift, shift_time
from ditlab.methods.rae.train import DecoderRecipe, train_decoder

TINY = DecoderRecipe(steps=80, batch_size=32, decoder=DecoderShape(width=32, depth=1, num_heads=2), warmup_steps=5,
                     lr=2e-3, final_lr=2e-3, stats_images=400, holdout=64)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny digits RAE (digits ViT encoder, 1-block decoder), trained for 80 steps and saved."""
    rae, scores = train_decoder(TINY)
    folder = rae.save(tmp_path_factory.mktemp("rae") / "digits")
    return rae, scores, folder


def digits(count: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    from ditlab.data.digits import digits_tensors

    images, labels = digits_tensors(16)
    return images[:count], labels[:count]


def test_decoder_reconstruction_loss_falls(trained):
    _, scores, _ = trained
    assert scores["loss_last"] < 0.6 * scores["loss_first"]
    assert scores["holdout"]["psnr"] > 12.0  # well above a constant image's (about 6 dB on the digits)


def test_encode_decode_round_trip(trained):
    rae, _, folder = trained
    images, _ = digits(5)
    latents = rae.encode_latents(images)
    assert latents.shape == (5, 64, 4, 4) and rae.latent_dim == 1024
    assert rae.decode_latents(latents).shape == (5, 1, 16, 16)
    posterior = rae.encode(images).latent_dist  # what ditlab.data.latents.encode_batch asks of a VAE
    assert torch.equal(posterior.mean, latents) and not posterior.std.any()
    loaded = load_rae(folder)
    assert torch.equal(loaded.decode(latents).sample, rae.decode_latents(latents))
    assert loaded.identity()["weights_hash"] == rae.identity()["weights_hash"]
    standardised = rae.encode_latents(digits(400)[0])  # the statistics standardise the training distribution
    assert abs(standardised.mean().item()) < 0.2 and 0.7 < standardised.std().item() < 1.3


def test_noise_augmentation_draws_sigma_per_image():
    from ditlab.methods.rae.autoencoder import RAE

    latents = torch.zeros(64, 8, 4, 4)
    assert torch.equal(RAE.noised(latents, 0.0), latents)
    spread = RAE.noised(latents, 0.8, torch.Generator().manual_seed(0)).flatten(1).std(1)
    assert spread.max() <= 0.8 * 1.3 and spread.min() < 0.2 and spread.std() > 0.1  # sigma ~ U(0, tau) per image


def test_time_shift_formula():
    assert dimension_shift(16 * 16 * 768, 4096) == pytest.approx(math.sqrt(48))  # RAE's DINOv2-B/256: 6.93
    assert dimension_shift(1024, 256) == 2.0
    t = torch.linspace(0, 1, 11)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted[1:-1] > t[1:-1])
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    base = FlowMatching(t_scale=1000.0)
    draws = base.sample_time(256, torch.device("cpu"), torch.Generator().manual_seed(0))
    again = ShiftedFlowMatching(base, 2.0).sample_time(256, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.allclose(again, 2 * draws / (1 + draws))
    # the sampling grid shift:S is the same map of a uniform grid from 1 (RAE: down to 0; diffusers: to a small sigma)
    grid = flow_grid("shift:2", 10)[:-1]
    uniform = grid / (2 - grid)  # the inverse of shift_time(., 2)
    assert torch.allclose(shift_time(uniform, 2.0), grid) and torch.allclose(uniform.diff(), uniform.diff()[:1])


def rae_module(folder, **overrides):
    from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
    from ditlab.methods.rae.module import RAEModule
    from ditlab.models.config import DiTConfig

    network = DiTConfig(input_size=4, patch_size=1, in_channels=64, hidden_size=64, depth=2, num_heads=2,
                        num_classes=10, learn_sigma=False)  # fmt: skip
    torch.manual_seed(0)
    return RAEModule(rae=str(folder), base_dim=256, network=network, ema_decay=None, lr=2e-3,
                     objective=ObjectiveConfig(kind="flow", t_scale=1000.0),
                     sampling=SamplingConfig(sampler="euler", steps=4, cfg_scale=1.0), **overrides)  # fmt: skip


def test_tiny_dit_trains_in_rae_latent_space(trained):
    _, _, folder = trained
    module = rae_module(folder)
    assert module.time_shift == 2.0 and module.sampling.time_grid == "shift:2"
    assert isinstance(module.objective, ShiftedFlowMatching)
    images, labels = digits(32)
    latents, _ = module.unpack_batch((images, labels))  # pixels are encoded on the fly
    assert latents.shape == (32, 64, 4, 4)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        module.seed_training_draws(0)  # the same noise each step: the loss itself must fall
        loss = module.training_losses(latents, labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses
    samples = module.sample(labels[:3])
    assert samples.shape == (3, 1, 16, 16) and samples.abs().max() <= 1


def test_rae_module_refuses_mismatched_network(trained):
    from ditlab.methods.rae.module import RAEModule
    from ditlab.models.config import DiTConfig

    _, _, folder = trained
    with pytest.raises(ValueError, match="in_channels: 64"):
        RAEModule(rae=str(folder), network=DiTConfig(preset="digits"))
    narrow = DiTConfig(input_size=4, patch_size=1, in_channels=64, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="width >= token dimension"):
        RAEModule(rae=str(folder), network=narrow)


def test_fit_records_the_rae_in_the_checkpoint(trained, tmp_path):
    import lightning as L

    from ditlab.data.digits import DigitsDataModule
    from ditlab.methods.rae.module import RAEModule
    from ditlab.models.loading import read_checkpoint

    _, _, folder = trained
    module = rae_module(folder)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, DigitsDataModule(batch_size=16))
    path = tmp_path / "rae.ckpt"
    trainer.save_checkpoint(path)
    meta = read_checkpoint(path)["ditlab"]
    assert meta["vae"] == str(folder) and meta["latent_scale"] == 1.0 and meta["rae"]["time_shift"] == 2.0
    assert meta["sampled_by"].endswith("RAEModule")
    bundle = RAEModule.checkpoint_bundle(read_checkpoint(path))  # what ditlab sample / eval sample
    assert bundle.vae == str(folder) and bundle.latent_scale == 1.0
    assert bundle.sampling.time_grid == "shift:2"  # the shifted grid the run sampled with


def test_encode_writes_rae_latents(trained, tmp_path):
    from ditlab.data.latents import LatentDataModule
    from ditlab.data.shards import read_meta
    from ditlab.tools.encode import encode

    rae, _, folder = trained
    out = tmp_path / "latents"
    code = encode("digits", str(out), encoder=str(folder), image_size=16, shard_size=1000, batch_size=512,
                  device="cpu", num_workers=0, progress=False)  # fmt: skip
    assert code == 0
    meta = read_meta(out)
    assert meta["vae"]["kind"] == "rae" and meta["latent_shape"] == [64, 4, 4] and meta["mode"] == "sample"
    assert meta["scaling_factor"] == 1.0 and meta["num_shards"] == 2
    data = LatentDataModule(str(out), sample_posterior=False, flip=False, batch_size=16, num_workers=0)
    data.setup()
    latents, label = data.train_set[3]
    images, labels = digits(4)
    assert label == labels[3] and torch.allclose(latents, rae.encode_latents(images[3:4])[0], atol=1e-5)
    import lightning as L

    module = rae_module(folder)  # trains on the pre-extracted latents, checked against its own RAE at fit start
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, data)
    assert trainer.global_step == 1
    with pytest.raises(ValueError, match="--encoder with --vae"):
        encode("digits", str(tmp_path / "other"), vae="/some/vae", encoder=str(folder), image_size=16, progress=False,
               device="cpu", num_workers=0)  # fmt: skip


def test_ddt_head_trunk():
    from ditlab.models.budget import flops_per_image
    from ditlab.models.config import DiTConfig
    from ditlab.models.dit import DiT, DiTBlock

    config = DiTConfig(input_size=4, patch_size=1, in_channels=16, hidden_size=64, depth=1, num_heads=2,
                       num_classes=10, learn_sigma=False, block="ddt-head", trunk="ddt",
                       trunk_options={"width": 32, "depth": 2, "num_heads": 2})  # fmt: skip
    torch.manual_seed(0)
    dit = DiT(config)
    x, t, y = torch.randn(3, 16, 4, 4), torch.tensor([1.0, 300.0, 900.0]), torch.tensor([0, 1, 2])
    assert dit(x, t, y).shape == (3, 16, 4, 4)
    head = dit.blocks[0]
    for layer in (head.adaLN_modulation[-1],):  # a head block with a per-token condition equal on every token is the
        torch.nn.init.normal_(layer.weight, std=0.1)  # plain DiT block with that vector
    tokens, vector = torch.randn(3, 16, 64), torch.randn(3, 64)
    assert torch.allclose(head(tokens, vector.unsqueeze(1).expand(-1, 16, -1)), DiTBlock.forward(head, tokens, vector),
                          atol=1e-5)  # fmt: skip
    encoder_only = sum(block.macs(16, dit.trunk.encoder_config) for block in dit.trunk.encoder)
    assert flops_per_image(dit) > 2 * encoder_only > 0
    with pytest.raises(ValueError, match="ddt-head"):
        DiT(config.replace(block="dit"))


def test_missing_encoder_weights_are_one_line(tmp_path, monkeypatch):
    from ditlab.methods.rae import rae_encoder

    monkeypatch.delenv("DITLAB_SIGLIP_MODEL", raising=False)
    with pytest.raises(FileNotFoundError, match="DITLAB_SIGLIP_MODEL"):
        rae_encoder("siglip2")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        rae_encoder("mae", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="rae.json"):
        load_rae(tmp_path)
    with pytest.raises(ValueError, match="unknown RAE encoder"):
        rae_encoder("clip-b")


def test_local_transformers_encoders(tmp_path):
    """SigLIP and MAE from local folders (tiny random configs): patch tokens in raster order, final norm unscaled."""
    transformers = pytest.importorskip("transformers")
    from ditlab.methods.rae import rae_encoder

    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(0)
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**sizes)).save_pretrained(tmp_path / "siglip")
    transformers.ViTMAEModel(transformers.ViTMAEConfig(**sizes)).save_pretrained(tmp_path / "mae")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    for kind in ("siglip2", "mae"):
        encoder = rae_encoder(kind, path=str(tmp_path / kind.removesuffix("2")))
        tokens = encoder.tokens(images)
        assert encoder.grid == 4 and encoder.feature_dim == 32 and tokens.shape == (2, 16, 32)
        assert torch.allclose(tokens.mean(-1), torch.zeros(2, 16), atol=1e-4)  # LayerNorm without its affine
        assert torch.equal(tokens, encoder.tokens(images))  # MAE: no random masking or shuffling
