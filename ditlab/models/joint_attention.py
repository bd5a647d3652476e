"""Joint attention over a text stream and an image stream with separate weights (MM-DiT).

Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (2024, SD3) and FLUX.1
(Black Forest Labs, 2024): each stream projects its own queries, keys and values (and normalises its own queries and
keys), the two are concatenated into one sequence, attended jointly, split back, and each stream has its own output
projection. The image stream is the registry attention component (:class:`~ditlab.models.attention.Attention`: its
``qkv``, ``proj``, q/k norms, rotary positions and operator), so attention operators and grafting apply to it as to
DiT's; the text stream adds ``context_qkv``, ``context_proj`` (absent in a context-pre-only block, whose text output
nothing reads) and ``context_q_norm`` / ``context_k_norm``.

The sequence is ``[text; image]`` and the mixing is the image attention's ``mix`` (rotary positions over the whole
sequence with text tokens unrotated, as FLUX's all-zero text ids; then the operator). SD3 concatenates
``[image; text]`` instead, which only reorders the keys of an unmasked softmax. Like SD3 and FLUX the text padding
mask is not applied: every token attends to every text token. Checked against diffusers 0.42.1
(``JointAttnProcessor2_0``, ``FluxAttnProcessor``).
"""

from __future__ import annotations

import torch
from torch import nn

from ditlab.models.attention import head_norm
from ditlab.models.components import build_component
from ditlab.models.config import DiTConfig


class JointAttention(nn.Module):
    """``attn(tokens (B, L + N, D)) -> (out (B, L + N, D), map (B, H, S, S) or None)``, ``tokens = [text; image]``.

    The last ``config.num_tokens`` tokens are the image; ``out`` is ``[text out; image out]``, or the image rows
    ``(B, N, D)`` alone when ``context_pre_only`` (SD3's last block).
    """

    def __init__(self, config: DiTConfig, block: int | None = None, context_pre_only: bool = False) -> None:
        super().__init__()
        self.image = build_component("attention", config, block)
        if not (callable(getattr(self.image, "heads", None)) and callable(getattr(self.image, "mix", None))):
            raise ValueError(f"joint attention needs an attention component with heads() and mix() (ditlab's "
                             f"Attention); the {config.attention!r} kind builds "
                             f"{type(self.image).__name__}")  # fmt: skip
        self.num_tokens = config.num_tokens
        self.context_pre_only = context_pre_only
        heads, head_dim, hidden = self.image.num_heads, self.image.head_dim, config.hidden_size
        self.context_qkv = nn.Linear(hidden, 3 * heads * head_dim)
        self.context_proj = None if context_pre_only else nn.Linear(heads * head_dim, hidden)
        self.context_q_norm = head_norm(config.qk_norm, head_dim)
        self.context_k_norm = head_norm(config.qk_norm, head_dim)

    def context_heads(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``text (B, L, D)`` -> normalised ``q, k, v (B, H, L, Dh)`` of the text stream."""
        batch, length, _ = text.shape
        qkv = self.context_qkv(text).reshape(batch, length, 3, self.image.num_heads, self.image.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return self.context_q_norm(q), self.context_k_norm(k), v

    def forward(self, tokens: torch.Tensor, return_map: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        length = tokens.shape[1] - self.num_tokens
        if length < 0:
            raise ValueError(f"joint attention over {self.num_tokens} image tokens got {tokens.shape[1]} tokens")
        text, image = tokens[:, :length], tokens[:, length:]
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(self.context_heads(text), self.image.heads(image)))
        mixed, weights = self.image.mix(q, k, v, return_map)
        image_out = self.image.proj(mixed[:, length:])
        if self.context_proj is None:
            return image_out, weights
        return torch.cat([self.context_proj(mixed[:, :length]), image_out], dim=1), weights

    def macs(self, num_tokens: int, text_length: int = 0) -> int:
        """Multiply-accumulates per image: each stream's projections and the operator over ``L + N`` tokens."""
        operator_macs = getattr(self.image.operator, "macs", None)
        if operator_macs is None:
            raise ValueError(f"the {self.image.operator_name!r} attention operator does not count its FLOPs; "
                             "give it a macs(num_tokens, num_heads, head_dim) method")  # fmt: skip
        image = num_tokens * (self.image.qkv.weight.numel() + self.image.proj.weight.numel())
        text = text_length * (self.context_qkv.weight.numel()
                              + (0 if self.context_proj is None else self.context_proj.weight.numel()))  # fmt: skip
        mixing = operator_macs(num_tokens + text_length, self.image.num_heads, self.image.head_dim)
        return image + text + int(mixing)
