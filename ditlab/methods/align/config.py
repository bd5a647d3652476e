"""Typed configuration of the alignment family (dataclasses, so LightningCLI validates every key).

Block numbers here are **1-indexed** as in the papers ("block k" is the output of the k-th block); the
modules convert them to the 0-based indices of ``models/taps.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class EncoderConfig:
    """The frozen encoder whose patch features (and attention maps) are the targets.

    Args:
        name: ``digits-vit`` or ``scene-clip`` (ditlab's own, trained once and cached) or a DINOv2 model
            (``dinov2-vits14``, ``dinov2-vitb14``, ``dinov2-vitl14``, ``dinov2-vitg14``, each also ``_reg``).
        weights: local DINOv2 weight file or folder (else ``$DITLAB_DINOV2_WEIGHTS``, then the hub cache).
        repo: local clone of facebookresearch/dinov2 (else ``$DITLAB_DINOV2_REPO``, then the hub cache).
        cache_dir: where ``digits-vit`` and ``scene-clip`` are cached; None means ``$DITLAB_CACHE`` or ``~/.cache/ditlab``.
    """

    name: str = "digits-vit"
    weights: str | None = None
    repo: str | None = None
    cache_dir: str | None = None


@dataclass
class FeatureAlignConfig:
    """REPA: projected DiT tokens after each of ``blocks`` pushed towards the encoder's patch features.

    Args:
        blocks: DiT blocks aligned (1-indexed; REPA: 8 for L/XL, 4 for B); one projector each, losses averaged.
        weight: lambda of ``L = L_diffusion + lambda * L_proj`` (REPA: 0.5).
        projector: ``mlp`` (REPA: a per-token MLP) or ``conv`` (iREPA: one 3x3 convolution over the token grid,
            which keeps neighbouring tokens' structure in the projection).
        projector_hidden: hidden width of the projector MLP (REPA: 2048).
        projector_layers: linear layers in the projector MLP, SiLU between them (REPA: 3).
        spatial_norm: iREPA's spatial normalisation of the encoder targets, ``z - gamma * mean_tokens(z)`` divided
            by the per-channel std over tokens, with this ``gamma``; None leaves the targets as they are (REPA).
    """

    blocks: list[int] = field(default_factory=lambda: [8])
    weight: float = 0.5
    projector: Literal["mlp", "conv"] = "mlp"
    projector_hidden: int = 2048
    projector_layers: int = 3
    spatial_norm: float | None = None


@dataclass
class AttentionAlignConfig:
    """HASTE: DiT attention maps of ``blocks`` distilled from the encoder's maps of ``encoder_blocks``.

    Args:
        blocks: DiT blocks (1-indexed; HASTE on SiT-XL/2: 5, 6, 7, 8).
        encoder_blocks: encoder block paired with each DiT block (HASTE: DINOv2-B 9, 10, 11, 12).
        weight: weight of the attention term (HASTE: 0.5).
        loss: ``ce`` (HASTE: row-wise cross-entropy, teacher as target) or ``kl`` (CE minus teacher entropy;
            same gradient, zero at a perfect match).
        heads: ``first``: DiT head ``i`` matches encoder head ``i`` for the encoder's H heads (HASTE; the DiT
            needs at least H heads); ``mean``: head-averaged maps on both sides (any head counts).
    """

    blocks: list[int] = field(default_factory=lambda: [5, 6, 7, 8])
    encoder_blocks: list[int] = field(default_factory=lambda: [9, 10, 11, 12])
    weight: float = 0.5
    loss: Literal["ce", "kl"] = "ce"
    heads: Literal["first", "mean"] = "first"


@dataclass
class CleanAlignConfig:
    """Self-Transcendence phase 1: a head on a shallow block regresses the clean-latent quantity.

    Args:
        block: the shallow DiT block with the head (1-indexed; SiT-B/2 script: 2).
        target: ``velocity`` (the released code) or ``x0`` (the paper's wording; the head's velocity is turned
            into ``x0_hat`` through the interpolant, so the two differ by a ``1/t^2``-like weight).
        weight: weight of the head loss (0.5).
        hidden: hidden width of the head's MLP (2048).
        layers: linear layers of the head's MLP before its LayerNorm and output map (the code: 3, REPA's MLP).
        t_range: the loss counts only samples with ``t`` in this closed range (t=0 data); the others still
            count in the batch mean, as in the code ([0.4, 0.7]).
    """

    block: int = 2
    target: Literal["velocity", "x0"] = "velocity"
    weight: float = 0.5
    hidden: int = 2048
    layers: int = 3
    t_range: tuple[float, float] = (0.4, 0.7)


@dataclass
class GuidedAlignConfig:
    """Self-Transcendence phase 2: a shallow student block aligned to CFG-extrapolated teacher features.

    Args:
        teacher_block: teacher block whose tokens are guided (1-indexed; SiT-B/2 script: 8).
        block: student block aligned (1-indexed; 6).
        guidance: ``w`` in ``f_g = f_u + w (f_c - f_u)`` (SiT-B/2 script: 30; code default 5).
        weight: lambda of the alignment term (0.5).
        loss: ``mse`` (the code) or ``cosine`` (REPA's negative cosine).
        hidden: hidden width of the projector MLP (2048).
        layers: linear layers of the projector MLP (the code: 3, REPA's MLP).
        t_range: as in phase 1 ([0.4, 0.7]).
    """

    teacher_block: int = 8
    block: int = 6
    guidance: float = 30.0
    weight: float = 0.5
    loss: Literal["mse", "cosine"] = "mse"
    hidden: int = 2048
    layers: int = 3
    t_range: tuple[float, float] = (0.4, 0.7)


@dataclass
class PhaseOneTeacherConfig:
    """Where the frozen phase-1 network comes from (phase 2 only).

    Args:
        checkpoint: a ditlab ``.ckpt`` written by phase 1; None trains ``recipe`` with
            ``--model.init_args.phase 1 --trainer.max_steps <steps>`` once and caches it (by recipe hash).
        recipe: the config run for phase 1 when there is no checkpoint.
        steps: phase-1 training steps when it is built from ``recipe``.
        recipe_args: further ``ditlab fit`` arguments for phase 1 (part of the cache key).
        weights: ``raw`` (the released code) or ``ema`` network of the checkpoint.
        cache_dir: where built teachers are kept; None means ``$DITLAB_CACHE/teachers``.
    """

    checkpoint: str | None = None
    recipe: str = "configs/self_transcendence.yaml"
    steps: int = 300
    recipe_args: list[str] = field(default_factory=list)
    weights: Literal["raw", "ema"] = "raw"
    cache_dir: str | None = None


@dataclass
class ClassTokenConfig:
    """REG: the encoder's class token, noised like the latents, enters the DiT as one extra token and is denoised.

    Args:
        weight: weight of the class token's flow-matching loss (REG: 0.03).
        align: also align the projected class-token position to the encoder's class token (REG's projection
            loss covers the class token and the patches).
    """

    weight: float = 0.03
    align: bool = True
