"""Alignment on VAE latents, as the papers run it: the encoder sees the clean image, never the latents.

End to end with no downloads: a tiny random ``AutoencoderKL`` encodes a few images into shards, a DINOv2-shaped
toy encoder (a local hub clone, the width of ``dinov2-vits14``) is the target, and ``ditlab fit`` runs a
``configs/repa.yaml``-style config on ``LatentDataModule(pixels=True)`` for 10 steps.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ditlab.cli import main
from ditlab.data.latents import LatentDataModule, encode_to_shards, folder_source
from ditlab.methods.align.encoders import FrozenEncoder, digits_vit, dinov2

ROOT = Path(__file__).resolve().parents[3]

TOY_DINO = '''
"""A DINOv2-shaped toy (the hub model's attribute layout, width 384 as dinov2_vits14), for tests."""
import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj((((q * self.scale) @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)

    def forward(self, x):
        return x + self.attn(self.norm1(x))


class ToyDino(nn.Module):
    def __init__(self, dim=384, depth=12, heads=6):
        super().__init__()
        self.patch_size, self.num_register_tokens = 14, 0
        self.patch_embed = nn.Conv2d(3, dim, 14, 14)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def prepare_tokens_with_masks(self, x, masks=None):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)


def dinov2_vits14(pretrained=True):
    return ToyDino()
'''


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> dict:
    """6 RGB images (2 classes) -> a tiny 2x-down-sampling VAE -> moments shards with flips; a toy DINOv2 on disk."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("latent-align")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / "images" / name).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / "images" / name / f"{index}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, layers_per_block=1,
                        latent_channels=4)  # fmt: skip
    vae.save_pretrained(root / "vae")
    source = folder_source(str(root / "images"), 32)
    report = encode_to_shards(source, root / "shards", str(root / "vae"), 32, shard_size=4, batch_size=3, flip=True,
                              progress=False)  # fmt: skip
    assert report.complete
    (root / "dinov2").mkdir()
    (root / "dinov2" / "hubconf.py").write_text(TOY_DINO)
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_dinov2_hubconf", root / "dinov2" / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    torch.manual_seed(1)
    torch.save(hub.dinov2_vits14().state_dict(), root / "dinov2_vits14_pretrain.pth")
    return {"root": root, "vae": str(root / "vae"), "shards": str(root / "shards"), "source": source}


def test_latent_batches_carry_the_clean_image_flipped_with_its_latents(latents):
    data = LatentDataModule(latents["shards"], vae=latents["vae"], latent_size=16, batch_size=2, num_workers=0,
                            pixels=True)  # fmt: skip
    data.setup("fit")
    dataset = data.train_set
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        latent, label, image = dataset[0]
        assert latent.shape == (4, 16, 16) and image.shape == (3, 32, 32) and image.abs().max() <= 1
        row = int(dataset.rows[0])
        original = latents["source"].load(int(dataset.indices[row]))
        flipped = torch.equal(image, original.flip(-1))
        assert flipped or torch.equal(image, original)
        seen.add(flipped)
    assert seen == {True, False}  # flips happen, and the image follows its latents
    plain = LatentDataModule(latents["shards"], vae=latents["vae"], batch_size=2, num_workers=0)
    plain.setup("fit")
    assert len(plain.train_set[0]) == 2


def test_moved_images_are_refused_in_one_line(latents, tmp_path):
    data = LatentDataModule(latents["shards"], batch_size=2, num_workers=0, pixels=True, pixels_root=str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="set data.pixels_root to their folder"):
        data.setup("fit")


def test_encoders_refuse_latents_and_unscaled_pixels(latents):
    encoder = dinov2("dinov2-vits14", weights=str(latents["root"]), repo=str(latents["root"] / "dinov2"))
    for bad, words in ((torch.randn(2, 4, 16, 16), "takes pixels (B, 1 or 3, H, W)"),
                       (torch.rand(2, 3, 32, 32) * 255, "takes pixels in [-1, 1] but got values")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(words)) as error:
            encoder(bad, 4)
        assert "\n" not in str(error.value)
    assert encoder(torch.rand(2, 3, 32, 32) * 2 - 1, 4).class_token.shape == (2, 384)
    with pytest.raises(ValueError, match=r"digits-vit takes pixels \(B, 1, H, W\)"):
        digits_vit()(torch.zeros(1, 3, 16, 16), 4)


def fit_config(latents: dict, tmp_path: Path, pixels: bool) -> Path:
    """``configs/repa.yaml`` with ``configs/data/imagenet_latents.yaml`` on the shards: a tiny SiT on 4x16x16
    latents, the toy DINOv2, 10 steps."""
    config = yaml.safe_load((ROOT / "configs" / "repa.yaml").read_text())
    config["trainer"].update(max_steps=10, val_check_interval=None, callbacks=[], enable_progress_bar=False,
                             logger={"init_args": {"save_dir": str(tmp_path / "runs"), "name": "repa-latents"}})  # fmt: skip
    model = config["model"]["init_args"]
    model["network"] = {"input_size": 16, "in_channels": 4, "patch_size": 4, "hidden_size": 32, "depth": 4, "num_heads": 2,
                        "num_classes": 2, "learn_sigma": False}  # fmt: skip
    model["encoder"] = {"name": "dinov2-vits14", "weights": str(latents["root"]), "repo": str(latents["root"] / "dinov2")}
    model["feature"].update(blocks=[2], projector_hidden=16)
    model["vae"] = latents["vae"]
    model["sampling"]["steps"] = 2
    config["data"] = yaml.safe_load((ROOT / "configs" / "data" / "imagenet_latents.yaml").read_text())["data"]
    config["data"]["init_args"].update(root=latents["shards"], vae=latents["vae"], latent_size=16, batch_size=3,
                                       num_workers=0, pixels=pixels)  # fmt: skip
    path = tmp_path / "repa-latents.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_repa_fits_on_latents_with_the_encoder_seeing_pixels(latents, tmp_path, monkeypatch, capsys):
    seen = []
    forward = FrozenEncoder.forward

    def spy(self, images, grid, attention=()):
        seen.append(tuple(images.shape))
        return forward(self, images, grid, attention)

    monkeypatch.setattr(FrozenEncoder, "forward", spy)
    assert main(["fit", "--config", str(fit_config(latents, tmp_path, pixels=True))]) == 0
    assert seen == [(3, 3, 32, 32)] * 10  # every step: the clean 32x32 RGB images, never the 4x16x16 latents
    assert (tmp_path / "runs/repa-latents/version_0/checkpoints/final.ckpt").is_file()

    seen.clear()
    capsys.readouterr()
    assert main(["fit", "--config", str(fit_config(latents, tmp_path / "no-pixels", pixels=False))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set data.init_args.pixels: true" in err[0] and not seen
