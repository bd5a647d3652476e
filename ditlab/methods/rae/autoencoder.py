"""A Representation Autoencoder: a frozen representation encoder, per-element latent standardisation, a ViT decoder.

Zheng et al., "Diffusion Transformers with Representation Autoencoders" (2025); read against bytetriper/RAE
(``src/stage1/rae.py``, ``src/calculate_stat.py``). The latent of an image is the encoder's patch tokens laid out as
``(F, grid, grid)`` and standardised element-wise with the training set's mean and variance (RAE's
``normalization_stat_path``: ``(z - mean) / sqrt(var + eps)``, statistics over the batch dimension only). The decoder
is a ViT (MAE-decoder style, as RAE's ``GeneralDecoder``): a linear map of each token to the decoder width, fixed
2-D sin-cos positions, pre-norm blocks, a final LayerNorm and a linear map to the token's ``p x p`` pixel patch.

An :class:`RAE` lives in a folder (``rae.json`` + ``weights.safetensors``: decoder and statistics; the encoder is
rebuilt from its name and options, loaded only when something is encoded, so decoding samples needs the folder
alone). It answers the calls ditlab makes of a VAE (``encode(x).latent_dist.mean/std``, ``decode(z).sample``,
``config.in_channels``), so ``ditlab encode --encoder FOLDER`` and ``ditlab.data.vae.decode_latents`` run it as they
run an ``AutoencoderKL``; its posterior is a point (``std`` 0).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save
from torch import nn

from ditlab.atomic import save_bytes, save_json
from ditlab.methods.align.encoders.digits_vit import ViTBlock
from ditlab.methods.rae.encoders import RepresentationEncoder, rae_encoder
from ditlab.models.positions import sincos_2d

FORMAT = "ditlab-rae/1"
SPEC, WEIGHTS = "rae.json", "weights.safetensors"
EPS = 1e-5


@dataclass(frozen=True)
class DecoderShape:
    """The ViT decoder's size (RAE decodes DINOv2-B with ViT-B/L/XL decoders; ditlab's digits use a tiny one)."""

    width: int = 96
    depth: int = 3
    num_heads: int = 4
    mlp_ratio: float = 4.0


class ViTDecoder(nn.Module):
    """``tokens (B, grid^2, F) -> images (B, C, grid * p, grid * p)``."""

    def __init__(self, feature_dim: int, grid: int, patch_size: int, channels: int, shape: DecoderShape) -> None:
        super().__init__()
        self.grid, self.patch_size, self.channels = grid, patch_size, channels
        self.embed = nn.Linear(feature_dim, shape.width)
        self.register_buffer("pos_embed", torch.from_numpy(sincos_2d(shape.width, grid)).float()[None], persistent=False)
        self.blocks = nn.ModuleList(ViTBlock(shape.width, shape.num_heads, shape.mlp_ratio) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(shape.width, eps=1e-6)
        self.head = nn.Linear(shape.width, patch_size * patch_size * channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens) + self.pos_embed.to(tokens.dtype)
        for block in self.blocks:
            hidden, _ = block(hidden)
        patches = self.head(self.norm(hidden))
        p, grid, batch = self.patch_size, self.grid, len(tokens)
        patches = patches.reshape(batch, grid, grid, p, p, self.channels)
        return torch.einsum("nhwpqc->nchpwq", patches).reshape(batch, self.channels, grid * p, grid * p)


def tokens_to_latents(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """``(B, grid^2, F) -> (B, F, grid, grid)`` (RAE's ``reshape_to_2d``)."""
    return tokens.transpose(1, 2).reshape(len(tokens), tokens.shape[-1], grid, grid)


def latents_to_tokens(latents: torch.Tensor) -> torch.Tensor:
    return latents.flatten(2).transpose(1, 2)


class RAE(nn.Module):
    """Frozen encoder + standardisation + ViT decoder; ``spec`` is ``rae.json``'s content.

    ``encode_latents(images) -> (B, F, g, g)`` standardised; ``decode_latents(z) -> images``; ``noised(z, tau)`` is
    RAE's noise augmentation (``z + sigma eps``, ``sigma ~ U(0, tau)`` per image).
    """

    def __init__(self, spec: dict, decoder: ViTDecoder, mean: torch.Tensor, var: torch.Tensor,
                 encoder: RepresentationEncoder | None = None, folder: Path | None = None) -> None:  # fmt: skip
        super().__init__()
        self.spec, self.decoder, self.folder = spec, decoder, folder
        self.register_buffer("latent_mean", mean.float().clone())
        self.register_buffer("latent_var", var.float().clone())
        self._encoder = [encoder]  # a list: not a submodule, so the RAE's weights are the decoder and statistics only
        self.config = SimpleNamespace(in_channels=spec["channels"], latent_channels=spec["latent_shape"][0],
                                      scaling_factor=1.0, shift_factor=None)  # fmt: skip

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.spec["latent_shape"])

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @property
    def channels(self) -> int:
        return int(self.spec["channels"])

    @property
    def latent_dim(self) -> int:
        channels, height, width = self.latent_shape
        return channels * height * width

    @property
    def encoder(self) -> RepresentationEncoder:
        """The frozen encoder, built from the spec on first use, on the decoder's device."""
        if self._encoder[0] is None:
            spec = self.spec["encoder"]
            self._encoder[0] = rae_encoder(spec["name"], **spec.get("options", {}))
        encoder = self._encoder[0]
        device = self.latent_mean.device
        if next(encoder.parameters()).device != device:
            encoder.to(device)
        return encoder

    # ----------------------------------------------------------------------------------- latents
    def standardise(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.latent_mean) / torch.sqrt(self.latent_var + EPS)

    def unstandardise(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * torch.sqrt(self.latent_var + EPS) + self.latent_mean

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> standardised latents ``(B, F, g, g)``."""
        size = self.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            raise ValueError(f"this RAE encodes {size}x{size} images, got {tuple(images.shape[-2:])}; resize them or "
                             f"train a decoder at that size")  # fmt: skip
        tokens = self.encoder.tokens(images.to(self.latent_mean.device))
        return self.standardise(tokens_to_latents(tokens, self.latent_shape[1]))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Standardised latents ``(B, F, g, g)`` -> images (about [-1, 1], not clamped)."""
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"this RAE decodes latents of shape {self.latent_shape}, got {tuple(latents.shape[1:])}")
        raw = self.unstandardise(latents.to(self.latent_mean.dtype))
        return self.decoder(latents_to_tokens(raw))

    @staticmethod
    def noised(latents: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """RAE's noise-augmented decoder input: ``z + sigma eps`` with ``sigma ~ U(0, tau)`` per image."""
        if tau <= 0:
            return latents
        shape = (len(latents),) + (1,) * (latents.ndim - 1)
        sigma = tau * torch.rand(shape, device=latents.device, generator=generator)
        return latents + sigma * torch.randn(latents.shape, device=latents.device, generator=generator)

    # ----------------------------------------------------------------------------------- what ditlab asks of a VAE
    def encode(self, images: torch.Tensor) -> SimpleNamespace:
        """``latent_dist.mean`` / ``.std`` as an ``AutoencoderKL`` answers (a point posterior: ``std`` 0)."""
        if images.shape[1] != self.channels and self.channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        mean = self.encode_latents(images)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.zeros_like(mean)))

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.decode_latents(latents))

    # ----------------------------------------------------------------------------------- folders
    def identity(self) -> dict:
        """What a latent shard folder records about its RAE (``kind: rae``; the path may differ between machines)."""
        spec = json.dumps({key: value for key, value in self.spec.items() if key not in ("scores", "encoder")},
                          sort_keys=True)  # fmt: skip
        encoder = self.spec.get("encoder_identity", {})
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
        return {"kind": "rae", "path": str(self.folder.resolve()) if self.folder else None,
                "config_hash": hashlib.sha256((spec + json.dumps(encoder, sort_keys=True)).encode()).hexdigest()[:12],
                "weights_hash": digest.hexdigest()[:12]}  # fmt: skip

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"decoder.{key}": value.detach().cpu().contiguous() for key, value in self.decoder.state_dict().items()}
        tensors |= {"latent_mean": self.latent_mean.cpu().contiguous(), "latent_var": self.latent_var.cpu().contiguous()}
        save_bytes(save(tensors), folder / WEIGHTS)
        save_json(self.spec, folder / SPEC, indent=2)
        self.folder = folder
        return folder


def build_decoder(spec: dict) -> ViTDecoder:
    channels, grid, _ = spec["latent_shape"]
    shape = DecoderShape(**spec["decoder"])
    return ViTDecoder(channels, grid, spec["image_size"] // grid, spec["channels"], shape)


def is_rae_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / SPEC).is_file()


def load_rae(folder: str | Path, encoder: RepresentationEncoder | None = None) -> RAE:
    """The RAE saved in ``folder`` (frozen, eval mode); a missing or foreign folder is one line."""
    folder = Path(folder).expanduser()
    if not (folder / SPEC).is_file():
        raise FileNotFoundError(f"RAE folder {folder} has no {SPEC}; train a decoder first (python -m "
                                "ditlab.methods.rae.train --config configs/rae_decoder.yaml --out FOLDER)")  # fmt: skip
    spec = json.loads((folder / SPEC).read_text())
    if spec.get("format") != FORMAT:
        raise ValueError(f"{folder / SPEC} is not an RAE spec (format {spec.get('format')!r}, expected {FORMAT!r})")
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"RAE folder {folder} has no {WEIGHTS}; the decoder training did not finish")
    tensors = load_file(str(folder / WEIGHTS))
    decoder = build_decoder(spec)
    decoder.load_state_dict({key[len("decoder."):]: value for key, value in tensors.items()
                             if key.startswith("decoder.")})  # fmt: skip
    rae = RAE(spec, decoder, tensors["latent_mean"], tensors["latent_var"], encoder=encoder, folder=folder)
    return rae.requires_grad_(False).eval()
