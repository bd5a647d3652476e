"""The ``pixart`` block kind: self-attention, cross-attention to the caption, MLP, under adaLN-single.

PixArt-alpha (Chen et al., "PixArt-alpha: Fast Training of Diffusion Transformer for Photorealistic Text-to-Image
Synthesis", 2023; PixArt-Sigma, Chen et al., 2024). Per block, with ``m = table + modulation.reshape(B, 6, D)`` (the
network's one shared ``Linear(SiLU(t_emb))`` from :class:`~ditlab.models.condition.TextEmbedder` with
``adaln: single``, plus this block's learned ``(6, D)`` ``scale_shift_table``) split into shift/scale/gate of the
attention and of the MLP::

    x = x + gate_msa * attn(LN1(x) * (1 + scale_msa) + shift_msa)
    x = x + cross_attn(x, text, mask)                  # the un-normalised stream, no gate
    x = x + gate_mlp * mlp(LN2(x) * (1 + scale_mlp) + shift_mlp)

LayerNorms without affine parameters, eps 1e-6 (``block_options: {norm_eps: ...}`` sets another, as diffusers'
``norm_eps``). The self-attention and MLP are the registry components the config names, so attention operators,
grafting and MLP kinds apply unchanged; the cross-attention is :class:`~ditlab.models.cross_attention.CrossAttention`
with the self-attention's heads (``num_heads`` x ``attention_head_dim``; [interp] a config with a pruned
``head_dim`` narrows it too, where PixArt's is always ``D`` wide). Parameter names are PixArt's public
``PixArtBlock`` (``attn``, ``cross_attn``, ``mlp``, ``scale_shift_table``). Checked against diffusers 0.42.1
``BasicTransformerBlock`` with ``norm_type='ada_norm_single'`` (``ditlab.models.diffusers_t2i.pixart`` converts
``PixArtTransformer2DModel``).

Initialisation (:meth:`PixArtBlock.initialize`, after the DiT one has made every linear Xavier with zero bias), as
PixArt-alpha's ``PixArt.initialize_weights``: the table ``randn / sqrt(D)`` (PixArt draws it at construction;
[interp] drawn again here, so re-initialising resets it) and the cross-attention output projection zeroed
(``block_options: {cross_attention_init: xavier}`` keeps the DiT loop's Xavier there instead, see below). The fused
``qkv`` and ``kv_linear`` are Xavier over their fused shapes, as PixArt's; the adaLN-single linear is N(0, 0.02) (the
text path's own initialisation); unlike DiT nothing else is zeroed, so a fresh block already runs its self-attention
and MLP (the network's output layer is zero, as in DiT and PixArt).

Why ``cross_attention_init: xavier`` exists: with the output projection at zero, no gradient reaches the
cross-attention's query, key and value maps until the projection has grown, and the projection grows only as far
as what the untrained (uniform) attention reads varies with the caption. PixArt starts from class-conditional
weights and trains for days; a 30-minute run from scratch on 2 cores stays in that stall (measured on the digit
scenes: the projection at mean |w| 0.008 after 2,000 steps, the caption moving the prediction by 1% of its scale).
The option removes the stall; whether the network then follows captions was decided there by the objective
(epsilon-trained it still ignored them, flow-trained it follows them: ``configs/pixart.yaml``).
"""

from __future__ import annotations

import torch
from torch import nn

from ditlab.models.branch import Branch, BranchHook, compute_branch
from ditlab.models.components import build_component, component_macs, register_block
from ditlab.models.condition import TextCondition
from ditlab.models.config import DiTConfig
from ditlab.models.cross_attention import CrossAttention

BLOCK_OPTIONS = {"norm_eps", "cross_attention_init"}


def modulate(tokens: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``tokens (B, N, D) * (1 + scale (B, D)) + shift (B, D)``."""
    return tokens * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


@register_block("pixart")
class PixArtBlock(nn.Module):
    """PixArt's block (see the module docstring): ``block(tokens (B, N, D), cond: TextCondition) -> (B, N, D)``."""

    def __init__(self, config: DiTConfig, block: int | None = None) -> None:
        super().__init__()
        if not config.text_conditioned or config.condition_options.get("adaln") != "single":
            raise ValueError("the 'pixart' block reads PixArt's shared adaLN-single modulation and the caption tokens: "
                             "use it with condition: text and condition_options.adaln: single")  # fmt: skip
        unknown = sorted(set(config.block_options) - BLOCK_OPTIONS)
        if unknown:
            raise ValueError(f"unknown pixart block_options {unknown}; known: {sorted(BLOCK_OPTIONS)}")
        hidden, eps = config.hidden_size, float(config.block_options.get("norm_eps", 1e-6))
        self.cross_attention_init = config.block_options.get("cross_attention_init", "zero")
        if self.cross_attention_init not in ("zero", "xavier"):
            raise ValueError(f"pixart block_options cross_attention_init={self.cross_attention_init!r} must be 'zero' "
                             f"(PixArt) or 'xavier'")  # fmt: skip
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=eps)
        self.attn = build_component("attention", config, block)
        self.cross_attn = CrossAttention(hidden, config.num_heads, head_dim=config.attention_head_dim)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=eps)
        self.mlp = build_component("mlp", config, block)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden) / hidden**0.5)

    def initialize(self) -> None:
        """PixArt's initialisation of the block's own parameters (the DiT initialisation ran first)."""
        hidden = self.scale_shift_table.shape[-1]
        with torch.no_grad():
            self.scale_shift_table.copy_(torch.randn(6, hidden) / hidden**0.5)
        if self.cross_attention_init == "zero":
            nn.init.zeros_(self.cross_attn.proj.weight)
            nn.init.zeros_(self.cross_attn.proj.bias)

    def forward(
        self,
        tokens: torch.Tensor,
        cond: TextCondition,
        *,
        return_attention: bool = False,
        branches: BranchHook | None = None,
        index: int = -1,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens: (B, N, D)``; with ``return_attention`` also the self-attention map ``(B, H, N, N)``.

        ``branches`` decides each branch's pre-gate output (``attention``, ``cross_attention`` with no gate, then
        ``mlp``; :mod:`ditlab.models.branch`), ``index`` names this block to it.
        """
        if not isinstance(cond, TextCondition) or cond.modulation is None:
            raise ValueError("the 'pixart' block needs a TextCondition with PixArt's adaLN-single modulation (a "
                             "network with condition: text and condition_options.adaln: single)")  # fmt: skip
        table = self.scale_shift_table[None] + cond.modulation.reshape(len(tokens), 6, self.scale_shift_table.shape[-1])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.unbind(1)
        text, mask = cond.tokens, cond.mask
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
        cross_in = tokens
        read = branches(Branch(index, "cross_attention", lambda: cross_in,
                               lambda inputs: self.cross_attn(inputs, text, mask), None, unit=1))  # fmt: skip
        tokens = tokens + read
        mlp_in = tokens
        fed = branches(Branch(index, "mlp", lambda: modulate(self.norm2(mlp_in), shift_mlp, scale_mlp), self.mlp,
                              gate_mlp, unit=2))  # fmt: skip
        tokens = tokens + gate_mlp.unsqueeze(1) * fed
        return (tokens, weights) if return_attention else tokens

    @staticmethod
    def units() -> list[tuple[str, str]]:
        """The branches this block offers a hook, in order (``ditlab.models.trunk``)."""
        return [("attention", "attention"), ("cross_attention", "cross_attention"), ("mlp", "mlp")]

    def macs(self, num_tokens: int, config: DiTConfig) -> int:
        """Multiply-accumulates per image: the self-attention and MLP components and the cross-attention to
        ``condition_options.text_length`` text tokens (0 when unset: its key/value side and mixing are then not
        counted). The shared adaLN-single linear runs once per network, not per block, so it is not counted here."""
        text_length = int(config.condition_options.get("text_length", 0))
        return (component_macs(self.attn, config.attention, num_tokens) + self.cross_attn.macs(num_tokens, text_length)
                + component_macs(self.mlp, config.mlp, num_tokens))  # fmt: skip
