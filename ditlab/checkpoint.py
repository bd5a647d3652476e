"""Reading ditlab checkpoints outside Lightning: the sampled (EMA) network and how to sample it.

A ditlab Lightning checkpoint carries a ``ditlab`` entry (written by ``DiffusionModule``) with the
architecture, objective, sampling and VAE settings, so a pruned student rebuilds at its own depth and a
checkpoint never needs the config file that trained it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.models.dit import DiT
from ditlab.models.loading import load_matching, network_from_checkpoint, read_checkpoint

__all__ = ["Bundle", "bundle_from_checkpoint", "known_fields", "run_settings", "load_matching", "network_from_checkpoint", "read_checkpoint"]


@dataclass
class Bundle:
    """Everything needed to sample a trained run."""

    network: DiT
    objective: object
    sampling: SamplingConfig
    vae: str | None
    latent_scale: float


def known_fields(cls, values: dict) -> dict:
    """The entries of ``values`` that are fields of dataclass ``cls`` (older checkpoints may carry others)."""
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in values.items() if key in names}


def run_settings(meta: dict) -> tuple[ObjectiveConfig, SamplingConfig]:
    """The objective and sampling settings recorded in a checkpoint's ``ditlab`` entry."""
    return (ObjectiveConfig(**known_fields(ObjectiveConfig, meta["objective"])),
            SamplingConfig(**known_fields(SamplingConfig, meta["sampling"])))  # fmt: skip


def bundle_from_checkpoint(path: str | Path, use_ema: bool = True) -> Bundle:
    """Network, objective and sampling settings of a ditlab checkpoint."""
    checkpoint = read_checkpoint(path)
    network = network_from_checkpoint(checkpoint, use_ema)
    meta = checkpoint["ditlab"]
    objective, sampling = run_settings(meta)
    return Bundle(network, objective.build(network.learn_sigma), sampling, meta.get("vae"), meta.get("latent_scale", 0.18215))
