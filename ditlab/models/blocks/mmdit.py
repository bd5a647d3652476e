"""The ``mmdit`` block kind: SD3's joint transformer block, FLUX's double-stream block.

Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (2024, SD3's MM-DiT) and
FLUX.1's double-stream blocks (Black Forest Labs, 2024; the same block with RMS q/k norms and rotary positions). The
block carries the text stream next to the image stream (``joint_text``: the network hands it ``tokens = [text;
image]``, ``(B, L + N, D)``, and its head reads the last ``N``). Each stream has its own adaLN-Zero modulation of
``cond.vector`` (six ``D`` chunks: shift, scale, gate of the attention and of the MLP), its own norms and MLP; the
two meet in one :class:`~ditlab.models.joint_attention.JointAttention`::

    a_x, a_c = joint_attention([LN(c) * (1 + scale_c) + shift_c; LN(x) * (1 + scale_x) + shift_x])
    x = x + gate_x * a_x                  c = c + gate_c * a_c
    x = x + gate_x' * mlp(LN(x) ...)      c = c + gate_c' * context_mlp(LN(c) ...)

``block_options: {context_pre_only: true}`` makes the network's last block SD3's last block: its text stream has
only a shift/scale modulation (SD3's ``AdaLayerNormContinuous``, whose halves are scale then shift; here shift then
scale), no text output projection and no text MLP, and the text tokens leave it unchanged (nothing reads them).

Branches (:mod:`ditlab.models.branch`): ``attention`` (inputs: the two modulated streams concatenated; fn: the joint
attention; gate None, since the block applies a gate per stream) and ``mlp`` (fn: each stream's MLP on its part, the
split at ``L = length - N``, so a hook applying it to a subset of tokens must keep that layout). In a
context-pre-only block both branches cover the image rows only (the attention returns ``(B, N, D)``, the MLP
branch is the image MLP on ``(B, N, D)``), so there each has the image stream's gate.

The image attention and both MLPs are the registry components the config names (the text MLP is the same kind as
the image one). The DiT initialisation makes every linear Xavier; :meth:`MMDiTBlock.initialize` then zeroes both
streams' adaLN linears (adaLN-Zero). Checked against diffusers 0.42.1 (``JointTransformerBlock``,
``FluxTransformerBlock``).
"""

from __future__ import annotations

import torch
from torch import nn

from ditlab.models.branch import Branch, BranchHook, compute_branch
from ditlab.models.components import build_component, component_macs, register_block
from ditlab.models.condition import TextCondition
from ditlab.models.config import DiTConfig
from ditlab.models.joint_attention import JointAttention

BLOCK_OPTIONS = {"context_pre_only"}


def modulate(tokens: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``tokens (B, N, D) * (1 + scale (B, D)) + shift (B, D)``."""
    return tokens * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def require_text(config: DiTConfig, kind: str) -> None:
    """Refuse, in one line, a text-stream block kind in a network without a text condition."""
    if not config.text_conditioned:
        raise ValueError(f"the {kind!r} block carries a text stream: use it with condition: text "
                         f"(this network's condition is {config.condition!r})")  # fmt: skip


def text_vector(cond: TextCondition, kind: str) -> torch.Tensor:
    if not isinstance(cond, TextCondition):
        raise ValueError(f"the {kind!r} block needs a TextCondition (a network with condition: text), "
                         f"got {type(cond).__name__}")  # fmt: skip
    return cond.vector


class MMDiTBlock(nn.Module):
    """Joint text/image block (see the module docstring): ``block([text; image] (B, L + N, D), cond) -> same``."""

    joint_text = True

    def __init__(self, config: DiTConfig, block: int | None = None, context_pre_only: bool | None = None) -> None:
        super().__init__()
        require_text(config, "mmdit")
        if context_pre_only is None:  # built as the 'mmdit' kind: the option names the network's last block
            unknown = sorted(set(config.block_options) - BLOCK_OPTIONS)
            if unknown:
                raise ValueError(f"unknown mmdit block_options {unknown}; known: {sorted(BLOCK_OPTIONS)}")
            context_pre_only = bool(config.block_options.get("context_pre_only", False)) and block == config.depth - 1
        hidden = config.hidden_size
        self.num_tokens = config.num_tokens
        self.context_pre_only = context_pre_only
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.context_norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = JointAttention(config, block, context_pre_only)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=config.mlp_norm_eps)
        self.mlp = build_component("mlp", config, block)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.context_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, (2 if context_pre_only else 6)
                                                                           * hidden))  # fmt: skip
        if context_pre_only:
            self.context_norm2 = self.context_mlp = None
        else:
            self.context_norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=config.mlp_norm_eps)
            self.context_mlp = build_component("mlp", config, block)

    def initialize(self) -> None:
        """adaLN-Zero: both streams' modulation linears start at zero (the DiT initialisation ran first)."""
        for modulation in (self.adaLN_modulation, self.context_adaLN_modulation):
            nn.init.zeros_(modulation[-1].weight)
            nn.init.zeros_(modulation[-1].bias)

    def forward(
        self,
        tokens: torch.Tensor,
        cond: TextCondition,
        *,
        return_attention: bool = False,
        branches: BranchHook | None = None,
        index: int = -1,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """``tokens: [text; image] (B, L + N, D)``; with ``return_attention`` also the joint map ``(B, H, S, S)``.

        ``branches`` decides each branch's pre-gate output and ``index`` names this block to it; the gates always
        come from ``cond``. The map is None when the hook does not compute the attention branch.
        """
        vector = text_vector(cond, "mmdit")
        length = tokens.shape[1] - self.num_tokens
        text, image = tokens[:, :length], tokens[:, length:]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(vector).chunk(6, dim=1)
        context = self.context_adaLN_modulation(vector).chunk(2 if self.context_pre_only else 6, dim=1)
        weights = None
        branches = branches or compute_branch

        def attend(inputs: torch.Tensor) -> torch.Tensor:
            nonlocal weights
            mixed, weights = self.attn(inputs, return_attention)
            return mixed

        def attention_inputs() -> torch.Tensor:
            return torch.cat([modulate(self.context_norm1(text), context[0], context[1]),
                              modulate(self.norm1(image), shift_a, scale_a)], dim=1)  # fmt: skip

        mixed = branches(Branch(index, "attention", attention_inputs, attend,
                                gate_a if self.context_pre_only else None, unit=0))  # fmt: skip
        if self.context_pre_only:
            image = image + gate_a.unsqueeze(1) * mixed
            image_in = image
            fed = branches(Branch(index, "mlp", lambda: modulate(self.norm2(image_in), shift_m, scale_m), self.mlp,
                                  gate_m, unit=1))  # fmt: skip
            image = image + gate_m.unsqueeze(1) * fed
            tokens = torch.cat([text, image], dim=1)
            return (tokens, weights) if return_attention else tokens
        _, _, c_gate_a, c_shift_m, c_scale_m, c_gate_m = context
        text = text + c_gate_a.unsqueeze(1) * mixed[:, :length]
        image = image + gate_a.unsqueeze(1) * mixed[:, length:]
        text_in, image_in = text, image

        def mlp_inputs() -> torch.Tensor:
            return torch.cat([modulate(self.context_norm2(text_in), c_shift_m, c_scale_m),
                              modulate(self.norm2(image_in), shift_m, scale_m)], dim=1)  # fmt: skip

        fed = branches(Branch(index, "mlp", mlp_inputs, self.stream_mlps, None, unit=1))
        text = text + c_gate_m.unsqueeze(1) * fed[:, :length]
        image = image + gate_m.unsqueeze(1) * fed[:, length:]
        tokens = torch.cat([text, image], dim=1)
        return (tokens, weights) if return_attention else tokens

    def stream_mlps(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[text; image] (B, L + N, D)`` -> each stream's MLP on its part, concatenated the same way."""
        length = tokens.shape[1] - self.num_tokens
        if length < 0:
            raise ValueError(f"the mmdit MLP branch splits [text; image] at its {self.num_tokens} image tokens; got "
                             f"{tokens.shape[1]} tokens (apply it to whole streams, not to a token subset)")  # fmt: skip
        return torch.cat([self.context_mlp(tokens[:, :length]), self.mlp(tokens[:, length:])], dim=1)

    @staticmethod
    def units() -> list[tuple[str, str]]:
        """The branches this block offers a hook, in order (``ditlab.models.trunk``)."""
        return [("attention", "attention"), ("mlp", "mlp")]

    def macs(self, num_tokens: int, config: DiTConfig) -> int:
        """Multiply-accumulates per image: both adaLN linears, the joint attention and both MLPs, with
        ``condition_options.text_length`` text tokens (0 when unset: the text stream is then not counted)."""
        text_length = int(config.condition_options.get("text_length", 0))
        macs = self.adaLN_modulation[-1].weight.numel() + self.context_adaLN_modulation[-1].weight.numel()
        macs += self.attn.macs(num_tokens, text_length) + component_macs(self.mlp, config.mlp, num_tokens)
        if self.context_mlp is not None and text_length:
            macs += component_macs(self.context_mlp, config.mlp, text_length)
        return macs


@register_block("mmdit")
def mmdit_block(config: DiTConfig, block: int | None = None) -> MMDiTBlock:
    return MMDiTBlock(config, block)


mmdit_block.joint_text = True  # what trunks ask before they are built (ditlab.models.components.block_kind_trait)
