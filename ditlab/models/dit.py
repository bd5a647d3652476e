"""The DiT / SiT backbone (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

Faithful to the public facebookresearch/DiT model: patch embedding with a fixed 2-D sin-cos position
embedding, a timestep MLP on 256 sinusoidal frequencies, a label table with a null class for
classifier-free guidance, adaLN-Zero blocks and a zero-initialised final layer. Parameter names match
the public checkpoints so they load with no renaming. SiT (Ma et al., 2024) uses the same network.

The architecture is one :class:`~ditlab.models.config.DiTConfig`; each block's attention and MLP are
components chosen by name from registries (:mod:`ditlab.models.components`), dense MLP and full attention
by default. Two options exist only to reproduce diffusers' port of DiT exactly (see ``models/interop.py``):
``freq_shift`` (diffusers divides the frequency exponent by ``half - 1``) and ``mlp_norm_eps``
(diffusers' second LayerNorm in a block uses eps 1e-5).

The forward pass is split into ``embed`` -> ``blocks`` -> ``head`` so that methods can tap, skip or
replace blocks (``models/taps.py``) without touching this file.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import ditlab.models.attention  # noqa: F401 - registers the "full" attention kind
import ditlab.models.mlp  # noqa: F401 - registers the "dense" MLP kind
from ditlab.diffusion.guidance import guided_output
from ditlab.models.branch import Branch, BranchHook, compute_branch
from ditlab.models.components import build_component, component_macs, register_block, register_condition
from ditlab.models.condition import TextCondition, condition_vector
from ditlab.models.config import DiTConfig
from ditlab.models.positions import position_table, sincos_1d, sincos_2d  # noqa: F401 - re-exported
from ditlab.models.trunk import Trunk


def modulate(tokens: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``tokens (B, N, D) * (1 + scale (B, D)) + shift (B, D)``."""
    return tokens * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_frequencies(t: torch.Tensor, dim: int = 256, freq_shift: float = 0.0) -> torch.Tensor:
    """``t: (B,)`` -> ``(B, dim)`` as ``[cos(t f), sin(t f)]`` with ``f_i = 10^4^(-i / (half - shift))``."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> ``(B, D)`` through sinusoidal features and a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, freq_shift: float = 0.0) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_frequencies(t, self.frequency_size, self.freq_shift)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> ``(B, D)``; row ``num_classes`` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def drop(self, labels: torch.Tensor, generator: torch.Generator | None = None,
             force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Replace labels by the null class: where ``force_drop_ids == 1`` if given, else each with probability
        ``dropout_prob`` (the public DiT's ``token_drop``)."""
        if force_drop_ids is None:
            draws = (torch.rand_like(labels, dtype=torch.float32) if generator is None  # traceable by torch.compile
                     else torch.rand(labels.shape, device=labels.device, generator=generator))  # fmt: skip
            dropped = draws < self.dropout_prob
        else:
            dropped = force_drop_ids == 1
        return torch.where(dropped, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Random drop-out in training mode unless the caller decided it (``force_drop_ids``, as in public DiT)."""
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.drop(labels, force_drop_ids=force_drop_ids)
        return self.embedding_table(labels)

    def condition(self, t_emb: torch.Tensor, labels: torch.Tensor,
                  force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The ``(B, D)`` vector the blocks read: timestep embedding plus label embedding."""
        return t_emb + self(labels, force_drop_ids)


@register_condition("class")
def class_condition(config: DiTConfig) -> LabelEmbedder:
    if config.condition_options:
        raise ValueError(f"the class condition takes no condition_options (got {sorted(config.condition_options)})")
    return LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)


class DiTBlock(nn.Module):
    """Attention then MLP, each behind an adaLN-Zero modulation of the conditioning vector.

    The attention and MLP are the components ``config.attention`` and ``config.mlp`` name
    (:mod:`ditlab.models.components`); the norms and the modulation are DiT's.
    """

    def __init__(self, config: DiTConfig, block: int | None = None) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = build_component("attention", config, block)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=config.mlp_norm_eps)
        self.mlp = build_component("mlp", config, block)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        tokens: torch.Tensor,
        cond: torch.Tensor,
        *,
        return_attention: bool = False,
        branches: BranchHook | None = None,
        index: int = -1,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens: (B, N, D)``, ``cond: (B, D)``; with ``return_attention`` also the ``(B, H, N, N)`` map.

        ``branches`` decides each branch's pre-gate output (:mod:`ditlab.models.branch`: a feature cache may
        reuse it) and ``index`` names this block to it; the gates always come from ``cond``. The map is None
        when the hook does not compute the attention branch.
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(cond).chunk(
            6, dim=1
        )
        weights = None
        branches = branches or compute_branch

        def attend(inputs: torch.Tensor) -> torch.Tensor:
            nonlocal weights
            mixed, weights = self.attn(inputs, return_attention)
            return mixed

        attention_in = tokens
        mixed = branches(Branch(index, "attention", lambda: modulate(self.norm1(attention_in), shift_msa, scale_msa),
                                attend, gate_msa, unit=0))  # fmt: skip
        tokens = tokens + gate_msa.unsqueeze(1) * mixed
        mlp_in = tokens
        fed = branches(Branch(index, "mlp", lambda: modulate(self.norm2(mlp_in), shift_mlp, scale_mlp), self.mlp,
                              gate_mlp, unit=1))  # fmt: skip
        tokens = tokens + gate_mlp.unsqueeze(1) * fed
        return (tokens, weights) if return_attention else tokens

    @staticmethod
    def units() -> list[tuple[str, str]]:
        """The branches this block offers a hook, in order (``ditlab.models.trunk``)."""
        return [("attention", "attention"), ("mlp", "mlp")]

    def macs(self, num_tokens: int, config: DiTConfig) -> int:
        """Multiply-accumulates per image: the adaLN linear and the two components."""
        return (self.adaLN_modulation[-1].weight.numel() + component_macs(self.attn, config.attention, num_tokens)
                + component_macs(self.mlp, config.mlp, num_tokens))  # fmt: skip


register_block("dit")(DiTBlock)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patches.

    ``table=True`` is PixArt's adaLN-single head: shift and scale are a learned ``(2, D)`` table plus the timestep
    embedding itself (no linear), where DiT (and SD3/FLUX, whose ``AdaLayerNormContinuous`` differs only in the
    order of its halves) apply ``Linear(SiLU(c))``.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, table: bool = False) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        if table:
            self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor | TextCondition) -> torch.Tensor:
        vector = condition_vector(cond)
        if hasattr(self, "scale_shift_table"):
            shift, scale = (self.scale_shift_table[None] + vector[:, None]).unbind(1)
        else:
            shift, scale = self.adaLN_modulation(vector).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(tokens), shift, scale))


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> ``(B, (H/p)(W/p), D)`` with a stride-p convolution."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class DiT(nn.Module):
    """Diffusion Transformer. ``dit(x, t, y) -> (B, out_channels, H, W)``, the public DiT call.

    Built from one :class:`~ditlab.models.config.DiTConfig` (``DiT(config)``, or ``DiT(**fields)`` as a
    shorthand); ``dit.config`` is that config, its depth following depth-pruning edits of ``dit.blocks``.
    """

    def __init__(self, config: DiTConfig | None = None, **fields) -> None:
        super().__init__()
        if config is not None and fields:
            raise TypeError("pass either a DiTConfig or its fields, not both")
        config = config if config is not None else DiTConfig(**fields)
        self._config = config
        hidden_size = config.hidden_size
        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=config.freq_shift)
        self.y_embedder = build_component("condition", config)
        if config.positions == "sincos":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(build_component("block", config, index) for index in range(config.depth))
        table = config.text_conditioned and config.condition_options.get("adaln") == "single"
        self.final_layer = FinalLayer(hidden_size, config.patch_size, config.out_channels, table=table)
        self.initialize_weights()
        # the trunk runs the blocks (ditlab.models.trunk); built after the DiT initialisation so a routing trunk's
        # own initialisation stands
        self.trunk: Trunk = build_component("trunk", config)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DiT:
        """``DiT.from_preset("S/2", input_size=16, in_channels=1)``: a preset, then free overrides."""
        return cls(DiTConfig(preset=name, **overrides))

    @property
    def config(self) -> DiTConfig:
        """The config that rebuilds this network (its depth follows edits of ``blocks``)."""
        if self._config.depth != len(self.blocks):
            self._config = self._config.replace(depth=len(self.blocks))
        return self._config

    # the sizes everyone reads, all from the one config
    input_size = property(lambda self: self._config.input_size)
    patch_size = property(lambda self: self._config.patch_size)
    in_channels = property(lambda self: self._config.in_channels)
    out_channels = property(lambda self: self._config.out_channels)
    learn_sigma = property(lambda self: self._config.learn_sigma)
    num_classes = property(lambda self: self._config.num_classes)
    text_conditioned = property(lambda self: self._config.text_conditioned)

    def condition_input(self, labels, device: torch.device | str | None = None):
        """``labels`` as this network takes them: captions encoded by its text encoder, labels and ``TextFeatures``
        passed through (refused in one line when they do not fit); the sampler asks this of any network."""
        from ditlab.models.text.prompts import condition_input

        return condition_input(self._config, labels, device)

    def initialize_weights(self) -> None:
        """The DiT initialisation: Xavier linears, N(0, 0.02) embedders, zeroed adaLN and output."""

        def xavier(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(xavier)
        if hasattr(self, "pos_embed"):
            self.pos_embed.data.copy_(position_table(self.pos_embed.shape[-1], self.x_embedder.grid_size,
                                                     self._config.position_options))  # fmt: skip
        kernel = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(kernel.data.view(kernel.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if isinstance(self.y_embedder, LabelEmbedder):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        blocks = [module for module in self.blocks.modules() if isinstance(module, DiTBlock)]  # also inside block kinds
        final = getattr(self.final_layer, "adaLN_modulation", None)
        for layer in [*(block.adaLN_modulation[-1] for block in blocks), *([final[-1]] if final else []),
                      self.final_layer.linear]:  # fmt: skip
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # components with their own initialisation (text blocks, the text path) apply it over the DiT defaults
        for module in self.modules():
            if module is not self and callable(getattr(module, "initialize", None)):
                module.initialize()

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def reset(self) -> None:
        """Start a sampling trajectory (the sampler calls this): components that keep state from call to call
        (block-sparse attention's searched patterns) forget it, so the same seed samples the same images."""
        for module in self.modules():
            if module is not self and callable(getattr(module, "reset", None)):
                module.reset()

    @property
    def text_stream(self) -> bool:
        """True when the text tokens travel with the image tokens as a prefix ``[text; image]`` (MM-DiT, FLUX blocks:
        ``joint_text`` block kinds); False when blocks read text from the condition (PixArt) or there is none."""
        return bool(len(self.blocks)) and getattr(self.blocks[0], "joint_text", False)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y,
              force_drop_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | TextCondition]:  # fmt: skip
        """``x: (B, C, H, W)``, ``t: (B,)``, ``y`` -> ``tokens: (B, N, D)``, ``cond``.

        ``y`` is the condition input: labels ``(B,)`` (``cond`` is then ``(B, D)``) or, for a text-conditioned
        network, ``TextFeatures`` (``cond`` a :class:`~ditlab.models.condition.TextCondition`; a network whose blocks
        carry a text stream gets ``tokens = [text; image]``, ``(B, L + N, D)``). ``force_drop_ids: (B,)`` (1 = null
        class / empty caption) replaces the random drop-out of training mode.
        """
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            raise ValueError(f"DiT built for {self.input_size}x{self.input_size} inputs got {tuple(x.shape[-2:])}")
        tokens = self.x_embedder(x)
        if hasattr(self, "pos_embed"):
            tokens = tokens + self.pos_embed
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        cond = self.y_embedder.condition(self.t_embedder(t), y, force_drop_ids)
        if self.text_stream:
            tokens = torch.cat([cond.tokens, tokens], dim=1)
        return tokens, cond

    def head(self, tokens: torch.Tensor, cond: torch.Tensor | TextCondition) -> torch.Tensor:
        """``tokens: (B, N, D)`` (or ``[text; image]``, whose image part is read) -> ``(B, out_channels, H, W)``."""
        if self.text_stream:
            tokens = tokens[:, -self.x_embedder.num_patches :]
        return self.unpatchify(self.final_layer(tokens, cond))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        tokens, cond = self.embed(x, t, y, force_drop_ids)
        return self.head(self.run_trunk(tokens, cond, t), cond)

    def run_trunk(self, tokens: torch.Tensor, cond: torch.Tensor, t: torch.Tensor,
                  branches: BranchHook | None = None) -> torch.Tensor:  # fmt: skip
        """Tokens ``(B, N, D)`` through the blocks as the trunk runs them; ``branches`` decides every branch
        (refused in one line by a trunk that cannot hand its blocks a hook)."""
        if branches is not None:
            self.trunk.require("branch_hooks", "a branch hook (feature cache)", self.config.trunk)
        t = t.expand(tokens.shape[0]) if t.ndim == 0 else t
        if branches is None:
            return self.trunk(self, tokens, cond, t)
        return self.trunk(self, tokens, cond, t, branches=branches)

    def units(self):
        """Every attention / MLP unit of the network with its global index (``ditlab.models.trunk.Unit``)."""
        return self.trunk.units(self)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_channels: int | None = None) -> torch.Tensor:  # fmt: skip
        """Guided output for the conditional labels ``y``: ``uncond + w (cond - uncond)``.

        The guided channels default to all ``in_channels``; ``cfg_channels=3`` reproduces the public DiT.
        """
        return guided_output(self, x, t, y, self.num_classes, cfg_scale, cfg_channels)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, N, p*p*C)`` in the order ``unpatchify`` inverts."""
        p = self.patch_size
        batch, channels, height, width = images.shape
        patches = images.reshape(batch, channels, height // p, p, width // p, p)
        return torch.einsum("nchpwq->nhwpqc", patches).reshape(batch, (height // p) * (width // p), p * p * channels)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, N, p*p*C)`` -> ``(B, C, H, W)``."""
        p, channels = self.patch_size, patches.shape[-1] // self.patch_size**2
        grid = int(patches.shape[1] ** 0.5)
        patches = patches.reshape(patches.shape[0], grid, grid, p, p, channels)
        return torch.einsum("nhwpqc->nchpwq", patches).reshape(patches.shape[0], channels, grid * p, grid * p)
