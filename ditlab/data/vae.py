"""Loading the frozen VAE (diffusers ``AutoencoderKL``) named once in a config.

Weights are never downloaded at run time here: a local folder (``config.json`` plus weights) is
required, and a missing one gets a message saying how to bring it in. :func:`vae_identity` fingerprints a
folder (config and weights) so latents pre-extracted with one VAE are never mixed with another's
(sd-vae-ft-ema and sd-vae-ft-mse share a config and differ only in weights).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def vae_folder(path: str) -> Path:
    """``path`` as a folder holding ``config.json``; otherwise the one-line error saying how to get it."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"VAE folder {folder} has no config.json: download stabilityai/sd-vae-ft-ema on a machine with "
            f"network (huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir {folder}) and copy it here"
        )
    return folder


loads_rae = True
"""``load_vae`` reads representation-autoencoder folders (``rae.json``: ``ditlab.methods.rae``) as latent spaces too."""


def load_vae(path: str) -> nn.Module:
    """A frozen ``AutoencoderKL`` from a local diffusers folder (e.g. a copy of stabilityai/sd-vae-ft-ema), or a
    representation autoencoder folder written by ``ditlab.methods.rae`` (frozen encoder + trained decoder)."""
    from diffusers import AutoencoderKL

    if (Path(path).expanduser() / "rae.json").is_file():
        from ditlab.methods.rae import load_rae

        return load_rae(path).requires_grad_(False).eval()

    vae = AutoencoderKL.from_pretrained(vae_folder(path), local_files_only=True, low_cpu_mem_usage=False)
    return vae.requires_grad_(False).eval()


def vae_config(path: str) -> dict:
    """The folder's ``config.json`` without diffusers' bookkeeping keys (``_diffusers_version``, ...)."""
    config = json.loads((vae_folder(path) / "config.json").read_text())
    return {key: value for key, value in config.items() if not key.startswith("_")}


@lru_cache(maxsize=16)
def _weights_hash(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        with open(name, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def vae_identity(path: str) -> dict:
    """``{"path", "config_hash", "weights_hash"}``: what a latent shard folder records about its VAE."""
    folder = vae_folder(path)
    config = json.dumps(vae_config(path), sort_keys=True)
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    stamp = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in weights)
    return {
        "path": str(folder.resolve()),
        "config_hash": hashlib.sha256(config.encode()).hexdigest()[:12],
        "weights_hash": _weights_hash(stamp) if stamp else None,
    }


def vae_latent_shape(path: str, image_size: int) -> tuple[int, int, int]:
    """``(C, h, w)`` latents of a ``(3, image_size, image_size)`` image: one halving per encoder block but the last."""
    config = vae_config(path)
    factor = 2 ** (len(config.get("block_out_channels", (128, 256, 512, 512))) - 1)
    if image_size % factor:
        raise ValueError(f"image size {image_size} is not divisible by the VAE's downsampling factor {factor} "
                         f"({path}); use a multiple of {factor}, e.g. {factor * max(1, image_size // factor)}")  # fmt: skip
    return config.get("latent_channels", 4), image_size // factor, image_size // factor


def decode_latents(vae: nn.Module, latents: torch.Tensor, latent_scale: float,
                   batch_size: int = 16) -> torch.Tensor:  # fmt: skip
    """Pixels (about [-1, 1]; not clamped) of ``latents`` that a latent-space network sampled: undo the
    training-time scaling (the DiT saw ``latents * latent_scale``) and decode in chunks of ``batch_size`` on the
    VAE's device, so a large batch never holds every decoder activation at once. The one latents -> pixels path
    of ditlab (the sampling tools, in-loop sample grids and metrics, the notebooks)."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        chunks = [vae.decode(chunk.to(device) / latent_scale).sample.to(latents.device)
                  for chunk in latents.split(batch_size)]  # fmt: skip
    return torch.cat(chunks) if chunks else latents
