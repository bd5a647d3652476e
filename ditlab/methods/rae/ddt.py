"""RAE's wide, shallow diffusion head (DiT^DH, after DDT: Wang et al. 2025), as a trunk kind ``ddt``.

RAE (Sec. 5, ``src/stage2/models/DDT.py``) runs a narrow DiT (the *encoder*, e.g. DiT-S: width 384, 12 blocks) on the
noisy latent, and a wide, shallow head (width 2048, 2 blocks) that re-embeds the noisy latent at its own width and is
modulated *per token* by the encoder's output ``s``: ``c = Linear(silu(t + s))``, the head blocks' adaLN reads ``c``
token by token. The head's width, not the encoder's, then has to match the high-dimensional tokens.

In ditlab the DiT's own width is the head's: ``DiTConfig.hidden_size`` (and ``depth``, ``num_heads``) describe the
head, whose blocks are the block kind ``ddt-head`` (DiT blocks whose adaLN also takes a per-token condition), and the
embedding and final layer are the DiT's, at the head width. ``trunk: ddt`` holds the narrow encoder
(``trunk_options``: ``width``, ``depth``, ``num_heads``, ``mlp_ratio``: plain DiT blocks) and runs
``s = encoder(P x, P_c c)``, then the head blocks on the wide tokens with ``c_tok = Q silu(P_c c + s)``.

[interp] at our scale, and where the core's seams decide: the encoder reads the head's patch embedding (position
included) through a linear map ``P`` (width -> encoder width) instead of its own patch embedding; any linear
embedding is reachable this way while the head is at least as wide as a patch's values (``C p^2``), which is the
regime the head exists for. The encoder's condition is the DiT's timestep + class vector through a linear map
``P_c`` (RAE: its own embedders at encoder width) and the head's condition adds it in place of the timestep alone;
the final layer is modulated by the global condition, not per token; positions are DiT's sin-cos table, not RoPE;
blocks keep DiT's LayerNorm, GELU MLP and qkv without norm (RAE: RMSNorm, SwiGLU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.models.components import register_block, register_trunk
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiTBlock
from ditlab.models.trunk import Trunk


class DDTHeadBlock(DiTBlock):
    """A DiT block whose condition may be per token, ``(B, N, D)``: each token is modulated by its own row."""

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor, **kwargs) -> torch.Tensor:
        if cond.ndim == 2:
            return super().forward(tokens, cond, **kwargs)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(cond).chunk(6, dim=-1)
        mixed, _ = self.attn(self.norm1(tokens) * (1 + scale_msa) + shift_msa)
        tokens = tokens + gate_msa * mixed
        return tokens + gate_mlp * self.mlp(self.norm2(tokens) * (1 + scale_mlp) + shift_mlp)

    def macs(self, num_tokens: int, config: DiTConfig) -> int:
        """The per-token adaLN linear runs on every token (the plain block's once per image)."""
        return super().macs(num_tokens, config) + (num_tokens - 1) * self.adaLN_modulation[-1].weight.numel()


register_block("ddt-head")(DDTHeadBlock)


class DDTTrunk(Trunk):
    """The narrow encoder, then the wide head blocks (``dit.blocks``) conditioned per token on its output."""

    def __init__(self, config: DiTConfig, width: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_ratio: float = 4.0) -> None:  # fmt: skip
        super().__init__()
        if config.block != "ddt-head":
            raise ValueError(f"trunk 'ddt' runs head blocks of kind 'ddt-head' (per-token adaLN); set block: ddt-head, "
                             f"not {config.block!r}")  # fmt: skip
        if width % num_heads:
            raise ValueError(f"trunk_options.width={width} is not divisible by num_heads={num_heads}")
        inner = config.replace(hidden_size=width, num_heads=num_heads, depth=depth, mlp_ratio=mlp_ratio, block="dit",
                               trunk="blocks", head_dim=None, mlp_hidden=None, block_options={}, trunk_options={})  # fmt: skip
        self.encoder_config = inner
        self.encoder = nn.ModuleList(DiTBlock(inner, index) for index in range(depth))
        self.tokens_in = nn.Linear(config.hidden_size, width)
        self.cond_in = nn.Linear(config.hidden_size, width)
        self.cond_out = nn.Linear(width, config.hidden_size)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.encoder:  # adaLN-Zero, as DiT initialises its blocks
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)

    def forward(self, dit: nn.Module, tokens: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cond.ndim != 2:
            raise ValueError("trunk 'ddt' reads a class-conditional network's (B, D) condition vector")
        condition = self.cond_in(cond)
        state = self.tokens_in(tokens)
        for block in self.encoder:
            state = block(state, condition)
        per_token = self.cond_out(F.silu(condition.unsqueeze(1) + state))
        for block in dit.blocks:
            tokens = block(tokens, per_token)
        return tokens

    def macs(self, num_tokens: int) -> int:
        """The encoder's blocks and the three projections (the head blocks are counted as the DiT's blocks)."""
        blocks = sum(block.macs(num_tokens, self.encoder_config) for block in self.encoder)
        return (blocks + num_tokens * (self.tokens_in.weight.numel() + self.cond_out.weight.numel())
                + self.cond_in.weight.numel())  # fmt: skip


@register_trunk("ddt")
def ddt_trunk(config: DiTConfig) -> DDTTrunk:
    return DDTTrunk(config, **config.trunk_options)
