"""The alignment family: REPA, HASTE and Self-Transcendence, on top of ``DiffusionModule``.

- REPA (Yu et al., "Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than
  You Think", 2024): projected DiT tokens aligned to a frozen encoder's patch features (``AlignModule``
  with ``feature``).
- HASTE (Wang et al., 2025, NUS-HPC-AI-Lab/HASTE): REPA plus attention-map alignment, both switched off at
  a termination step (``AlignModule`` with ``feature`` and ``attention``, plus
  ``ditlab.callbacks.alignment.AlignmentTermination``).
- REG (Wu et al., arXiv 2507.01467, Martinser/REG): REPA plus the encoder's class token entangled with the
  noisy latents as one extra token and denoised with them (``REGModule``). iREPA's convolutional projector and
  spatially normalised targets are options of ``FeatureAlignConfig`` (``projector: conv``, ``spatial_norm``).
- Self-Transcendence (Sun et al., csslc/Self-Transcendence, arXiv 2601.07773): no external encoder; a
  phase-1 clean-latent head, then alignment to the phase-1 network's CFG-guided features
  (``SelfTranscendenceModule``).

Configs: ``configs/repa.yaml``, ``configs/haste.yaml``, ``configs/reg.yaml``, ``configs/self_transcendence.yaml``.
"""

from ditlab.methods.align.base import AlignmentBase
from ditlab.methods.align.config import (
    AttentionAlignConfig,
    ClassTokenConfig,
    CleanAlignConfig,
    EncoderConfig,
    FeatureAlignConfig,
    GuidedAlignConfig,
    PhaseOneTeacherConfig,
)
from ditlab.methods.align.encoder_align import AlignModule
from ditlab.methods.align.reg import REGModule
from ditlab.methods.align.self_transcendence import SelfTranscendenceModule

__all__ = [
    "AlignModule",
    "AlignmentBase",
    "AttentionAlignConfig",
    "ClassTokenConfig",
    "CleanAlignConfig",
    "EncoderConfig",
    "FeatureAlignConfig",
    "GuidedAlignConfig",
    "PhaseOneTeacherConfig",
    "REGModule",
    "SelfTranscendenceModule",
]
