"""The ``flux`` and ``flux-single`` block kinds: FLUX.1's double-stream blocks, then its single-stream blocks.

FLUX.1 (Black Forest Labs, 2024; the MM-DiT of Esser et al., 2024, with parallel blocks as in Dehghani et al.,
"Scaling Vision Transformers to 22 Billion Parameters", 2023). ``block: flux`` with ``block_options: {double: n}``
builds the first ``n`` blocks as the double-stream ``mmdit`` block (:mod:`ditlab.models.blocks.mmdit`) and the rest
as :class:`FluxSingleBlock`; ``block: flux-single`` is a network of single blocks only.

The single block treats ``[text; image]`` as one sequence: one adaLN-Zero modulation of ``cond.vector`` (shift,
scale, gate: FLUX's ``AdaLayerNormZeroSingle``), and the attention and the MLP in parallel on the same modulated
input, their sum gated once::

    h = LN(x) * (1 + scale) + shift
    x = x + gate * (attn(h) + mlp(h))

FLUX's ``proj_out`` maps the concatenation ``[attention heads; MLP hidden]`` to ``D``; here it is split so the two are
separate components and branches: the attention's ``proj`` holds its first ``H Dh`` columns with the bias, the dense
MLP's ``fc2`` the rest with a zero bias (:mod:`ditlab.models.diffusers_t2i.flux` adds the two biases back). The
attention is the registry component (rotary positions over the sequence, text unrotated; RMS q/k norms with
``qk_norm: rms``) and the MLP the registry MLP (FLUX's ``proj_mlp`` is ``fc1``). Branches ``attention`` and ``mlp``
(units 0 and 1) share the gate; their inputs are the same modulated tokens, computed once. Checked against
diffusers 0.42.1 (``FluxSingleTransformerBlock``, ``FluxTransformerBlock``).
"""

from __future__ import annotations

import torch
from torch import nn

from ditlab.models.blocks.mmdit import MMDiTBlock, modulate, require_text, text_vector
from ditlab.models.branch import Branch, BranchHook, compute_branch
from ditlab.models.components import build_component, component_macs, register_block
from ditlab.models.condition import TextCondition
from ditlab.models.config import DiTConfig


class FluxSingleBlock(nn.Module):
    """FLUX's single-stream parallel block (see the module docstring): ``block([text; image], cond) -> same``."""

    joint_text = True

    def __init__(self, config: DiTConfig, block: int | None = None) -> None:
        super().__init__()
        require_text(config, "flux-single")
        hidden = config.hidden_size
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = build_component("attention", config, block)
        self.mlp = build_component("mlp", config, block)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 3 * hidden))

    def initialize(self) -> None:
        """adaLN-Zero: the modulation linear starts at zero (the DiT initialisation ran first)."""
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(
        self,
        tokens: torch.Tensor,
        cond: TextCondition,
        *,
        return_attention: bool = False,
        branches: BranchHook | None = None,
        index: int = -1,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens: [text; image] (B, L + N, D)``; with ``return_attention`` also the map ``(B, H, S, S)``."""
        shift, scale, gate = self.adaLN_modulation(text_vector(cond, "flux-single")).chunk(3, dim=1)
        weights, normed = None, None
        branches = branches or compute_branch

        def inputs() -> torch.Tensor:  # shared by both branches, computed at most once
            nonlocal normed
            if normed is None:
                normed = modulate(self.norm(tokens), shift, scale)
            return normed

        def attend(inputs: torch.Tensor) -> torch.Tensor:
            nonlocal weights
            mixed, weights = self.attn(inputs, return_attention)
            return mixed

        mixed = branches(Branch(index, "attention", inputs, attend, gate, unit=0))
        fed = branches(Branch(index, "mlp", inputs, self.mlp, gate, unit=1))
        tokens = tokens + gate.unsqueeze(1) * (mixed + fed)
        return (tokens, weights) if return_attention else tokens

    @staticmethod
    def units() -> list[tuple[str, str]]:
        """The branches this block offers a hook, in order (``ditlab.models.trunk``)."""
        return [("attention", "attention"), ("mlp", "mlp")]

    def macs(self, num_tokens: int, config: DiTConfig) -> int:
        """Multiply-accumulates per image: the adaLN linear, attention and MLP over ``L + N`` tokens
        (``L = condition_options.text_length``, 0 when unset)."""
        length = num_tokens + int(config.condition_options.get("text_length", 0))
        return (self.adaLN_modulation[-1].weight.numel() + component_macs(self.attn, config.attention, length)
                + component_macs(self.mlp, config.mlp, length))  # fmt: skip


@register_block("flux")
def flux_block(config: DiTConfig, block: int | None = None) -> nn.Module:
    """Block ``block`` of a FLUX network: double-stream below ``block_options.double``, single-stream from there."""
    unknown = sorted(set(config.block_options) - {"double"})
    double = config.block_options.get("double")
    if unknown or not isinstance(double, int) or double < 0:
        raise ValueError(f"the flux block needs block_options {{double: n}} (its first n blocks double-stream), "
                         f"got {config.block_options}")  # fmt: skip
    if block is not None and block < double:
        return MMDiTBlock(config, block, context_pre_only=False)
    return FluxSingleBlock(config, block)


flux_block.joint_text = True  # what trunks ask before they are built (ditlab.models.components.block_kind_trait)


@register_block("flux-single")
def flux_single_block(config: DiTConfig, block: int | None = None) -> FluxSingleBlock:
    if config.block_options:
        raise ValueError(f"the flux-single block takes no block_options (got {sorted(config.block_options)})")
    return FluxSingleBlock(config, block)


flux_single_block.joint_text = True
