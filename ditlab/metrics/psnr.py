"""Paired PSNR of generated images against their twins (the same seeds sampled another way), the fidelity measure
sampling-acceleration papers report beside FID (e.g. a cached sampler against the uncached one)."""

from __future__ import annotations

import torch


def paired_psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the PSNR (dB) of ``images`` against ``reference``, both in [-1, 1], on the [0, 1]
    scale; an exact twin counts as 100 dB."""
    mse = ((images - reference) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(1e-12))).clamp_max(100).mean())
