"""``REGModule``: Representation Entanglement for Generation, REPA plus one denoised encoder class token.

REG (Wu et al., "Representation Entanglement for Generation: Training Diffusion Transformers Is Much Easier
Than You Think", arXiv 2507.01467, Martinser/REG): the frozen encoder's class token of the clean image is noised
with the *same* ``t`` as the latents (its own noise), mapped into the DiT width (linear, then LayerNorm) and
prepended to the patch tokens as one extra token (position embedding zero). The network denoises both: the
patch tokens through the DiT's head, the class token through the final layer's adaLN-modulated norm and a
zero-initialised linear map back to the encoder width. The loss is

    L = L_FM(latents) + lambda_proj * L_proj + lambda_cls * L_FM(class token)        (0.5 and 0.03 in REG)

where ``L_proj`` is REPA's negative cosine over the class-token position and the patches (the encoder target is
``[class token, patch features]``). At sampling the class token starts from noise and is integrated with the
latents; the cost is one token (under 0.5% FLOPs at 256 tokens).

[interp] choices, where the paper and code leave room or where ditlab's seams shape it:
- the sampled state carries the class token as one extra channel plane of the latent (its first ``F`` values,
  the rest unused), so every core sampler (Euler, Heun, the SDE, guidance and its interval) integrates latents
  and class token jointly with the same steps; guidance applies to both with the one ``cfg_scale`` (REG exposes
  a separate class-token scale). The plane needs ``F <= H * W`` (digits-vit: 64 <= 256; DINOv2-B on 32x32
  latents: 768 <= 1024);
- the class-token embedding and output map are part of the generator, so they have their own EMA copy
  (``token_ema``) that sampling uses; a REG checkpoint records this module (``sampled_by``), whose
  ``checkpoint_bundle`` lets ``ditlab sample``/``eval`` sample it; ``ditlab convert``, which exports a network
  alone, refuses it in one line;
- REG has no termination step (the class token is denoised for the whole run), so ``AlignmentTermination``
  is idle for it.
- text-to-image networks: on PixArt blocks the class token is one more token of the image sequence, as on DiT
  (it self-attends with the patches and cross-attends to the caption); its output goes through PixArt's table
  head (the learned shift/scale table plus the timestep embedding). On an MM-DiT, whose blocks carry
  ``[text; image]`` with a weight set per stream and fix the image stream at the ``N`` patch tokens, it is the
  last token of the *text* stream, ``[text; class; image]``: it meets the patches in every joint attention
  (unrotated under RoPE, as REG's zero position embedding) through the text stream's weights, and in a
  context-pre-only last block (SD3) it leaves the second-last block's state unchanged, as text tokens do. The
  projector aligns ``[class; patches]`` in both (the caption tokens are not aligned).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from jsonargparse import lazy_instance
from torch import nn

from ditlab.checkpoint import Bundle, network_bundle
from ditlab.diffusion.cache import as_cache_config
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.diffusion.gaussian import mean_flat
from ditlab.diffusion.global_batch import draw_rows
from ditlab.diffusion.images import sample_from_config
from ditlab.distributed import data_parallel_split, local
from ditlab.methods.align.config import ClassTokenConfig, EncoderConfig, FeatureAlignConfig
from ditlab.methods.align.encoder_align import AlignModule
from ditlab.methods.align.encoders import encoder_info
from ditlab.methods.align.losses import negative_cosine
from ditlab.models.condition import condition_vector
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT, modulate


class ClassTokenPath(nn.Module):
    """The class token's way in and out of the DiT: ``(B, F) -> (B, 1, D)`` and ``(B, D) -> (B, F)``."""

    def __init__(self, feature_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.embed = nn.Linear(feature_dim, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.out = nn.Linear(hidden_size, feature_dim)
        nn.init.xavier_uniform_(self.embed.weight)
        nn.init.zeros_(self.embed.bias)
        nn.init.zeros_(self.out.weight)  # as the DiT's own output map: the class velocity starts at 0
        nn.init.zeros_(self.out.bias)

    @property
    def feature_dim(self) -> int:
        return self.embed.in_features

    def token(self, class_token: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embed(class_token)).unsqueeze(1)

    def velocity(self, token: torch.Tensor, cond, dit: DiT) -> torch.Tensor:
        """The class token's output through the DiT final layer's modulated norm, then ``out``; ``cond`` is the
        blocks' condition (a text network's ``TextCondition`` gives its adaLN vector; PixArt's head is a table)."""
        final, vector = dit.final_layer, condition_vector(cond)
        if hasattr(final, "scale_shift_table"):
            shift, scale = (final.scale_shift_table[None] + vector[:, None]).unbind(1)
        else:
            shift, scale = final.adaLN_modulation(vector).chunk(2, dim=1)
        return self.out(modulate(final.norm_final(token.unsqueeze(1)), shift, scale)).squeeze(1)


def entangled_forward(dit: DiT, path: ClassTokenPath, x: torch.Tensor, class_token: torch.Tensor, t: torch.Tensor,
                      y: torch.Tensor, hidden: tuple[int, ...] | list[int] = (),
                      force_drop_ids: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:  # fmt: skip
    """``dit`` on ``[class token; patch tokens]``: ``(output (B, C, H, W), class velocity (B, F), hidden)``.

    ``hidden`` are 0-based block indices whose tokens ``(B, 1 + N, D)`` (class token first) are returned. On a
    text-stream network (MM-DiT) the sequence is ``[text; class token; patch tokens]`` (the module notes) and
    ``hidden`` holds its ``[class token; patch tokens]`` part.
    """
    tokens, cond = dit.embed(x, t, y, force_drop_ids)
    prefix = tokens.shape[1] - dit.x_embedder.num_patches  # the text tokens an MM-DiT carries before the image
    tokens = torch.cat([tokens[:, :prefix], path.token(class_token).to(tokens.dtype), tokens[:, prefix:]], dim=1)
    wanted, captured = set(hidden), {}
    for index, block in enumerate(dit.blocks):
        tokens = block(tokens, cond)
        if index in wanted:
            captured[index] = tokens[:, prefix:]
    others = torch.cat([tokens[:, :prefix], tokens[:, prefix + 1 :]], dim=1)
    return dit.head(others, cond), path.velocity(tokens[:, prefix], cond, dit), captured


class EntangledModel(nn.Module):
    """A model function ``(state, t, y) -> velocity`` over REG's joint state for the core samplers.

    ``state: (B, C + 1, H, W)``: the latents, then one plane whose first ``F`` values are the class token.
    """

    def __init__(self, dit: DiT, path: ClassTokenPath) -> None:
        super().__init__()
        self.dit, self.path = dit, path
        self.config, self.num_classes = dit.config, dit.num_classes

    def forward(self, state: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        channels, features = self.dit.in_channels, self.path.feature_dim
        class_token = state[:, channels].flatten(1)[:, :features]
        output, velocity, _ = entangled_forward(self.dit, self.path, state[:, :channels], class_token, t, y)
        plane = torch.zeros_like(state[:, channels]).flatten(1)
        plane[:, :features] = velocity.to(plane.dtype)
        return torch.cat([output[:, :channels], plane.view_as(state[:, channels]).unsqueeze(1)], dim=1)


class REGModule(AlignModule):
    """REG on any DiT: REPA's projector alignment plus the entangled, denoised encoder class token.

    Args:
        network, objective, sampling: as in ``DiffusionModule``; the objective must be ``flow`` (REG trains SiT).
        encoder: the frozen encoder; it must return a class token (``digits-vit``, DINOv2).
        feature: REPA's projector alignment (REG: block 8 of XL, 4 of B, lambda 0.5, the 3-layer MLP).
        class_token: the class token's loss weight and whether its position is aligned too.
        options: every other ``DiffusionModule`` option.

    Loss terms: ``loss_diffusion``, ``loss_class_token`` (its flow-matching error), ``loss_align_feature``,
    ``loss_align`` (weighted projection term) and ``loss``.
    """

    network_samples_alone = False  # the class-token path samples with the DiT

    method = "reg"
    terminable = False

    def __init__(
        self,
        network: DiTConfig = lazy_instance(DiTConfig),
        objective: ObjectiveConfig = ObjectiveConfig(kind="flow"),
        sampling: SamplingConfig = SamplingConfig(),
        encoder: EncoderConfig = EncoderConfig(),
        feature: FeatureAlignConfig = FeatureAlignConfig(),
        class_token: ClassTokenConfig = ClassTokenConfig(),
        **options,
    ) -> None:
        if objective.kind != "flow":
            raise ValueError("REG denoises the class token with SiT's interpolant; set model.init_args.objective.kind=flow")
        if feature is None:
            raise ValueError("REG aligns the projected tokens as REPA does; model.init_args.feature cannot be null")
        if feature.projector == "conv" and class_token.align:
            raise ValueError("feature.projector=conv works on the patch grid and cannot project REG's class token; set "
                             "model.init_args.class_token.align false, or use projector=mlp")  # fmt: skip
        options.pop("attention", None)
        super().__init__(network=network, objective=objective, sampling=sampling, encoder=encoder, feature=feature,
                         attention=None, **options)  # fmt: skip
        self.method = "reg"
        self.class_token = class_token
        config = self.network_config
        features = encoder_info(encoder.name).feature_dim
        plane = config.input_size**2
        if features > plane:
            raise ValueError(f"REG samples the {features}-dim class token of {encoder.name} in one {config.input_size}x"
                             f"{config.input_size} plane ({plane} values); use a smaller encoder or larger inputs")  # fmt: skip
        self.token_path = ClassTokenPath(features, config.hidden_size)
        self.token_ema = copy.deepcopy(self.token_path).requires_grad_(False) if self.ema is not None else None
        self.summary["alignment"].update(method=self.method, class_token_weight=class_token.weight)

    # ----------------------------------------------------------------------------------- training
    def alignment_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        feature = self.feature
        noised, drop = self.training_draws(images, labels)
        target = self.encode(images)
        if target.class_token is None:
            raise ValueError(f"encoder {self.encoder_config.name} returns no class token; REG needs one")
        clean = target.class_token.float()
        rank, world_size = data_parallel_split(self._trainer)
        generator = self.training_generator(images.device)
        noise = draw_rows(lambda n: torch.randn((n, clean.shape[1]), device=clean.device, generator=generator),
                          len(clean), rank, world_size)  # fmt: skip
        a, s, da, ds = (c.view(-1, 1).to(clean.dtype) for c in self.objective.coefficients(noised.t))
        output, velocity, hidden = entangled_forward(
            self.network, self.token_path, noised.xt, a * clean + s * noise, noised.model_t, labels,
            hidden=[b - 1 for b in feature.blocks], force_drop_ids=drop,
        )  # fmt: skip
        terms = self.objective.losses(output, images, noised)
        terms["loss_class_token"] = mean_flat((velocity.float() - (da * clean + ds * noise)) ** 2).mean()
        patches = self.feature_targets(target.features)
        per_block = []
        for block in feature.blocks:
            tokens = hidden[block - 1]
            if self.class_token.align:
                wanted = torch.cat([clean.unsqueeze(1).to(patches.dtype), patches], dim=1)
                per_block.append(negative_cosine(self.heads[f"block{block}"](tokens), wanted))
            else:
                per_block.append(negative_cosine(self.heads[f"block{block}"](tokens[:, 1:]), patches))
        terms["loss_align_feature"] = torch.stack(per_block).mean()
        terms["loss_align"] = feature.weight * terms["loss_align_feature"]
        terms["loss"] = terms["loss"] + terms["loss_align"] + self.class_token.weight * terms["loss_class_token"]
        return terms

    def validation_step(self, batch, batch_idx: int) -> None:
        """``val/loss``: the sampled (EMA) network's latent flow loss, its class token noised like the latents."""
        batch, self._pixels = self.split_batch(batch)
        try:
            images, labels = self.unpack_batch(batch)
            clean = self.encode(images).class_token.float()
        finally:
            self._pixels = None
        generator = torch.Generator(device=images.device).manual_seed(1234 + batch_idx)
        noised = self.objective.prepare(images, generator=generator)
        noise = torch.randn(clean.shape, device=clean.device, generator=generator)
        a, s, _, _ = (c.view(-1, 1).to(clean.dtype) for c in self.objective.coefficients(noised.t))
        network, path = (self.ema, self.token_ema) if self.ema is not None else (self.network, self.token_path)
        output, _, _ = entangled_forward(network, path, noised.xt, a * clean + s * noise, noised.model_t, labels)
        loss = self.objective.losses(output, images, noised)["loss"]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(images))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*super().trainable_parameters(), *self.token_path.parameters()]

    @torch.no_grad()
    def update_ema(self) -> None:
        super().update_ema()
        targets, sources = [local(p) for p in self.token_ema.parameters()], [local(p) for p in self.token_path.parameters()]
        torch._foreach_lerp_(targets, sources, 1.0 - self.ema_decay)

    # ----------------------------------------------------------------------------------- sampling
    def sample(self, labels: torch.Tensor, seed: int = 0, start: int = 0, show_progress: bool = False,
               network: DiT | None = None, **overrides) -> torch.Tensor:  # fmt: skip
        """Images for ``labels``: latents and class token integrated jointly from noise (see the module notes)."""
        dit = network if network is not None else self.sampling_network
        path = self.token_ema if network is None and self.ema is not None else self.token_path

        def decode(state: torch.Tensor) -> torch.Tensor:
            return self.decode(state[:, :channels].to(self.device)).clamp(-1, 1).cpu()

        channels, size = dit.config.in_channels, dit.config.input_size
        was_training = path.training
        path.eval()
        try:
            return sample_from_config(dit, self.objective, self.sampling, labels, seed=seed, start=start,
                                      factory=entangled_factory(path), decode=decode, shape=(channels + 1, size, size),
                                      progress="sampling" if show_progress else None, **overrides)  # fmt: skip
        finally:
            path.train(was_training)

    @classmethod
    def checkpoint_bundle(cls, checkpoint: dict, use_ema: bool = True) -> Bundle:
        """What ``ditlab sample --ckpt REG.ckpt`` samples: the DiT and its class-token path (EMA copies unless
        ``use_ema=False``), the class token a plane of the sampled state (see the module notes)."""
        bundle = network_bundle(checkpoint, use_ema)
        state = checkpoint["state_dict"]
        prefix = "token_ema." if use_ema and any(key.startswith("token_ema.") for key in state) else "token_path."
        weights = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        dit = bundle.network
        path = ClassTokenPath(weights["embed.weight"].shape[1], dit.config.hidden_size)
        path.load_state_dict(weights)
        shape = (dit.config.in_channels + 1, dit.config.input_size, dit.config.input_size)
        return replace(bundle, factory=entangled_factory(path.eval()), shape=shape,
                       source=f"{bundle.source} with its class-token path")  # fmt: skip


def entangled_factory(path: ClassTokenPath):
    """``factory(network, objective, **sampling options) -> EntangledModel``: the DiT with ``path``; REG samples with
    its class token, so a feature cache on top is refused."""

    def entangled(network: DiT, objective, cache=None, **options) -> EntangledModel:
        if as_cache_config(cache).policy != "none":
            raise ValueError("REG samples with its class token; feature caching (sampling.cache) is not supported")
        return EntangledModel(network, path)

    return entangled
