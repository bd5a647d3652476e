"""Loading the frozen VAE (diffusers ``AutoencoderKL``) named once in a config.

Weights are never downloaded at run time here: a local folder (``config.json`` plus weights) is
required, and a missing one gets a message saying how to bring it in.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


def load_vae(path: str) -> nn.Module:
    """A frozen ``AutoencoderKL`` from a local diffusers folder (e.g. a copy of stabilityai/sd-vae-ft-ema)."""
    from diffusers import AutoencoderKL

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"VAE folder {folder} has no config.json: download stabilityai/sd-vae-ft-ema on a machine with "
            f"network (huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir {folder}) and copy it here"
        )
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
    return vae.requires_grad_(False).eval()
