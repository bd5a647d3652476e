"""Tiny text-to-image networks (PixArt and MM-DiT blocks, the ``random-words`` text encoder), their configs and
their teacher checkpoints, shared by every method test on text-conditioned networks (the caching, learned-caching
and feedback tests under ``sampling/``, the family x text-block checks of ``test_t2i_families_gaps.py``, ...)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import ditlab.models.blocks  # noqa: F401 - the core's text-conditioned block kinds
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT

TEXT = {"encoder": "random-words", "encoder_options": {"dim": 16, "context_length": 8}, "text_dim": 16,
        "text_length": 8}  # fmt: skip
"""A frozen text encoder that needs no training: 8 tokens of width 16, pooled width 16."""
TEXT_KINDS = {
    "pixart": {"block": "pixart", "condition_options": {**TEXT, "adaln": "single"}},
    "mmdit": {"block": "mmdit", "condition_options": {**TEXT, "pooled_dim": 16, "projection": "linear"},
              "qk_norm": "rms", "block_options": {"context_pre_only": True}},
}  # fmt: skip
"""PixArt (self-attention, cross-attention, MLP under adaLN-single) and SD3's MM-DiT (joint attention over
``[text; image]``, the last block context-pre-only)."""
TINY_T2I = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10,
                     learn_sigma=True, condition="text")  # fmt: skip


def text_config_of(kind: str, **fields) -> DiTConfig:
    """:data:`TINY_T2I` with the ``kind`` block and condition of :data:`TEXT_KINDS`; ``fields`` override both (a
    field of :data:`TEXT_KINDS` such as ``condition_options`` or ``block`` replaces the kind's whole value)."""
    return TINY_T2I.replace(**{**TEXT_KINDS[kind], **fields})


def build_text_network(kind: str, seed: int = 0, std: float = 0.1, **fields) -> DiT:
    """An eval-mode tiny ``kind`` network (config :func:`text_config_of`) whose every weight is perturbed by ``std``
    noise from ``seed`` (so the zero-initialised adaLN, cross-attention output and final layers matter)."""
    torch.manual_seed(seed)
    network = text_config_of(kind, **fields).build()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if name != "pos_embed":
                parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return network.eval()


@pytest.fixture(scope="session")
def text_network() -> Callable[..., DiT]:
    """``text_network(kind, seed=0, std=0.1, **fields)``: a tiny ``pixart`` or ``mmdit`` network (see
    :func:`build_text_network`)."""
    return build_text_network


@pytest.fixture(scope="session")
def text_config() -> Callable[..., DiTConfig]:
    """``text_config(kind, **fields)``: the tiny ``pixart`` or ``mmdit`` config, unbuilt (see :func:`text_config_of`)."""
    return text_config_of


@pytest.fixture(scope="session")
def text_kinds() -> dict[str, dict]:
    """:data:`TEXT_KINDS`: each text block kind's config fields (``block``, ``condition_options``, ...)."""
    return TEXT_KINDS


@pytest.fixture(scope="session")
def text_teacher_file(tmp_path_factory) -> Callable[[str], Path]:
    """``text_teacher_file(kind)``: the tiny ``kind`` network saved as a teacher checkpoint (DDIM, 4 steps, cfg 2),
    written once per session."""
    from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
    from ditlab.models.loading import network_checkpoint

    files: dict[str, Path] = {}

    def teacher(kind: str) -> Path:
        if kind not in files:
            path = tmp_path_factory.mktemp(f"teacher_{kind}") / "teacher.ckpt"
            torch.save(network_checkpoint(build_text_network(kind), ObjectiveConfig(),
                                          SamplingConfig(sampler="ddim", steps=4, cfg_scale=2.0)), path)  # fmt: skip
            files[kind] = path
        return files[kind]

    return teacher


CACHE_IDENTITY = {
    "none": {},
    "fora": {"interval": 1},
    "delta-dit": {"interval": 1},
    "teacache": {"threshold": 0.0},
    "taylorseer": {"interval": 1, "order": 2},
    "magcache": {"threshold": 0.0},
    "toca": {"interval": 1},
    "plan": "compute-everything",
}
"""Each built-in cache policy's setting that must reproduce the network (``plan``: a plan computing every unit)."""


@pytest.fixture(scope="session")
def cache_identity() -> dict:
    """The built-in cache policies' identity settings (:data:`CACHE_IDENTITY`)."""
    return CACHE_IDENTITY


@pytest.fixture(scope="session")
def identity_cache() -> Callable[..., dict]:
    """``(policy, network, folder, objective, sampler, steps) -> {"policy", "options"}`` at the policy's identity
    setting; ``plan`` gets a plan file in ``folder`` that computes every unit at every model call."""
    from ditlab.diffusion.sample import model_call_times
    from ditlab.methods.sampling.caches.plan import StaticPlan

    def settings(policy: str, network: DiT, folder: Path, objective, sampler: str, steps: int) -> dict:
        options = CACHE_IDENTITY[policy]
        if options == "compute-everything":
            times = model_call_times(objective, sampler, steps).tolist()
            plan = StaticPlan([[True] * len(network.units())] * len(times), times, sampler, steps, network.depth)
            options = {"path": str(plan.save(folder / "plan.json"))}
        return {"policy": policy, "options": options}

    return settings
