"""``AlignModule``: REPA feature alignment, and HASTE's attention alignment on top of it.

REPA (Yu et al., "Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than
You Think", 2024): the tokens after DiT block k go through a small MLP projector and are pushed, patch by
patch, to a high cosine similarity with a frozen encoder's features of the *clean* image, at every noise
level: ``L = L_diffusion + lambda * (-mean cos(proj(h_k), z))``.

HASTE (Wang et al., "REPA Works Until It Doesn't: Early-Stopped, Holistic Alignment Supercharges Diffusion
Training", 2025): also distil the encoder's attention maps into mid-level DiT blocks (row-wise cross-
entropy, teacher as target), and switch *all* alignment off at a fixed step
(``ditlab.callbacks.alignment.AlignmentTermination``), after which training is plain diffusion.

The token grids must match: DINOv2's input is resized to ``14 * grid`` (REPA's resize) so its patch grid
is the DiT's; ditlab's ``digits-vit`` has a fixed 4x4 grid whose features and maps are resampled
bilinearly to the DiT's grid when they differ (``ditlab.methods.align.encoders``). Attention maps are computed
only for the aligned blocks (``run_blocks(attention=...)``); every other block uses the fused kernel.

iREPA (Singh et al., "What matters for Representation Alignment: Global Information or Spatial Structure?",
arXiv 2512.10794, End2End-Diffusion/iREPA) is two options of ``feature``: a 3x3 convolution over the token grid
as the projector (``projector: conv``) and spatial normalisation of the targets (``spatial_norm: gamma``).

Text-conditioned training (PixArt, MM-DiT networks on captioned batches; ``encoder: scene-clip``, the scene CLIP's
image tower, is the text-to-image encoder): the aligned hidden states and maps are the image part
(:mod:`ditlab.methods.align.streams`); the captions condition the network and never reach the encoder.
"""

from __future__ import annotations

import torch
from jsonargparse import lazy_instance

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.align.base import AlignmentBase
from ditlab.methods.align.config import AttentionAlignConfig, EncoderConfig, FeatureAlignConfig
from ditlab.methods.align.encoders import EncoderOutput, FrozenEncoder, encoder_info, load_encoder
from ditlab.methods.align.losses import attention_loss, negative_cosine, projector, spatial_normalize
from ditlab.methods.align.streams import image_attention, image_tokens
from ditlab.models.config import DiTConfig
from ditlab.models.taps import run_blocks


def _check_blocks(key: str, blocks: list[int], depth: int, what: str) -> None:
    if not blocks:
        raise ValueError(f"{key} is empty; list at least one block (1-indexed)")
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ValueError(f"{key}={list(blocks)}: blocks {bad} out of range for {what} of depth {depth} "
                         f"(blocks are 1-indexed, 1..{depth})")  # fmt: skip


class AlignModule(AlignmentBase):
    """REPA (``feature``) and HASTE (``feature`` + ``attention`` + termination) on any DiT and objective.

    Args:
        network, objective, sampling: as in ``DiffusionModule`` (REPA and HASTE train SiT:
            ``objective.kind=flow``; network defaults to DiT-XL/2).
        encoder: the frozen target encoder (kept out of checkpoints; released at termination).
        feature: REPA's projector alignment; None turns it off.
        attention: HASTE's attention-map alignment; None turns it off.
        options: every other ``DiffusionModule`` option (lr, warmup, EMA, VAE, compile, checkpointing, ...).

    Loss terms: ``loss_diffusion``, ``loss_align_feature``, ``loss_align_attention``, ``loss_align`` (their
    weighted sum) and ``loss``. Projectors live in ``heads["block<k>"]`` (``(B, N, D) -> (B, N, F)``).
    """

    def __init__(
        self,
        network: DiTConfig = lazy_instance(DiTConfig),
        objective: ObjectiveConfig = ObjectiveConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        encoder: EncoderConfig = EncoderConfig(),
        feature: FeatureAlignConfig | None = FeatureAlignConfig(),
        attention: AttentionAlignConfig | None = None,
        **options,
    ) -> None:
        if feature is None and attention is None:
            raise ValueError("model.init_args.feature and model.init_args.attention are both null: nothing to align; "
                             "set one, or train ditlab.methods.base.DiffusionModule")  # fmt: skip
        self.method = "haste" if attention is not None else "repa"
        network = DiTConfig.plain(network)
        super().__init__(network=network, objective=objective, sampling=sampling, **options)
        self.encoder_config, self.feature, self.attention = encoder, feature, attention
        info = encoder_info(encoder.name)
        depth, width = self.network.depth, network.hidden_size
        if feature is not None:
            _check_blocks("model.init_args.feature.blocks", feature.blocks, depth, "the DiT")
            for block in sorted(set(feature.blocks)):
                self.heads[f"block{block}"] = projector(feature.projector, width, feature.projector_hidden,
                                                        info.feature_dim, feature.projector_layers)  # fmt: skip
        if attention is not None:
            _check_blocks("model.init_args.attention.blocks", attention.blocks, depth, "the DiT")
            _check_blocks("model.init_args.attention.encoder_blocks", attention.encoder_blocks, info.depth,
                          f"encoder {encoder.name}")  # fmt: skip
            if len(attention.blocks) != len(attention.encoder_blocks):
                raise ValueError(f"model.init_args.attention.blocks {attention.blocks} and encoder_blocks "
                                 f"{attention.encoder_blocks} must pair up (same length)")  # fmt: skip
            if attention.heads == "first" and network.num_heads < info.num_heads:
                raise ValueError(f"model.init_args.attention.heads=first needs a DiT with at least {info.num_heads} "
                                 f"heads ({encoder.name} has {info.num_heads}, the DiT {network.num_heads}); "
                                 "use attention.heads=mean")  # fmt: skip
        self.summary["alignment"].update(method=self.method, encoder=encoder.name)

    # ----------------------------------------------------------------------------------- encoder
    def load_target(self) -> FrozenEncoder:
        config = self.encoder_config
        encoder = load_encoder(
            config.name, weights=config.weights, repo=config.repo, cache_dir=config.cache_dir
        )
        for key in ("scores", "train_seconds"):
            if getattr(encoder, key, None) is not None:
                self.summary["alignment"][f"encoder_{key}"] = getattr(encoder, key)
        return encoder

    @property
    def encoder(self) -> FrozenEncoder | None:
        """The frozen encoder (loaded on first use); None after termination."""
        return self.target_network

    # ----------------------------------------------------------------------------------- losses
    def alignment_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Diffusion loss plus the feature and attention terms, from one tapped forward pass."""
        feature, attention = self.feature, self.attention
        noised, drop = self.training_draws(images, labels)
        tapped = run_blocks(
            self.network, noised.xt, noised.model_t, labels,
            hidden=[b - 1 for b in feature.blocks] if feature else (),
            attention=[b - 1 for b in attention.blocks] if attention else (), force_drop_ids=drop,
        )  # fmt: skip
        terms = self.objective.losses(tapped.output, images, noised)
        target = self.encode(images, attention=[b - 1 for b in attention.encoder_blocks] if attention else ())
        align = terms["loss"].new_zeros(())
        if feature is not None:
            features = self.feature_targets(target.features)
            per_block = [negative_cosine(self.heads[f"block{b}"](image_tokens(self.network, tapped.hidden[b - 1])),
                                         features) for b in feature.blocks]  # fmt: skip
            terms["loss_align_feature"] = torch.stack(per_block).mean()
            align = align + feature.weight * terms["loss_align_feature"]
        if attention is not None:
            per_pair = [attention_loss(image_attention(self.network, tapped.attention[s - 1]), target.attention[e - 1],
                                       attention.loss, attention.heads)
                        for s, e in zip(attention.blocks, attention.encoder_blocks)]  # fmt: skip
            terms["loss_align_attention"] = torch.stack(per_pair).mean()
            align = align + attention.weight * terms["loss_align_attention"]
        terms["loss_align"] = align
        terms["loss"] = terms["loss"] + align
        return terms

    def encode(self, images: torch.Tensor, attention: list[int] | tuple = ()) -> EncoderOutput:
        """The encoder's output for this batch's clean pixels, on the DiT token grid."""
        return self.encoder(self.encoder_pixels(images), self.network.x_embedder.grid_size, attention=attention)

    def feature_targets(self, features: torch.Tensor) -> torch.Tensor:
        """Patch features ``(B, N, F)`` as aligned: iREPA's spatial normalisation when configured."""
        gamma = self.feature.spatial_norm
        return features if gamma is None else spatial_normalize(features, gamma)

    def alignment_state(self) -> dict:
        return {**super().alignment_state(), "encoder": self.encoder_config.name}
