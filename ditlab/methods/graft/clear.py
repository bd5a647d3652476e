"""``clear``: CLEAR's local attention on the image tokens of an MM-DiT, its text tokens attended globally.

Liu et al., "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up" (NeurIPS 2025,
https://github.com/Huage001/CLEAR) linearise FLUX.1, whose joint attention runs over ``[text; image]``: each image
query attends the image keys inside a disc of radius ``r`` on the token grid (plus, with ``pool = d > 1``, a
``d x``-downsampled copy of all image keys and values) *and every text key*; each text query attends every key,
text and image, as in the dense model. So text-image interaction is kept whole and only image-image attention
becomes local, which is what makes the cost linear in the image tokens.

This kind is ditlab's ``local`` operator (:mod:`ditlab.models.operators.local`: disc, pooled keys, the gather /
dense / flex kernels) made aware of the text prefix: the operator knows the network's image token count ``N``,
and a sequence of ``S > N`` tokens is ``L = S - N`` text tokens then the image. On a network without a text stream
(DiT, PixArt's self-attention) ``S = N`` and it *is* ``local``. Register it with ``attention: clear``
(``attention_options: {radius, pool, kernel, blocks}``); :func:`~ditlab.methods.graft.build.graft_operator`
grafts it into an ``mmdit`` / ``flux`` network.

[interp] The text keys are appended to each image query's neighbourhood as global keys (the same place the
pooled keys go), so one softmax covers its local image keys, the pooled keys and the text keys; padding text
tokens are attended, as FLUX and SD3 attend them (no text mask).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ditlab.models.config import DiTConfig
from ditlab.models.operators.grid import (
    flex_attention_call,
    flex_block_mask,
    gathered_attention,
    masked_attention,
)
from ditlab.models.operators.local import LocalAttention
from ditlab.models.operators.registry import check_options, register_operator

KIND = "clear"


class JointLocalAttention(LocalAttention):
    """``local`` over the last ``num_tokens`` (image) tokens of the sequence; the ``L`` tokens before them (text) are
    attended by every query and attend every key."""

    name = KIND

    def __init__(self, num_tokens: int, radius: float, pool: int = 1, kernel: str = "auto") -> None:
        super().__init__(radius, pool, kernel)
        self.num_image_tokens = int(num_tokens)

    def text_length(self, length: int) -> int:
        text = length - self.num_image_tokens
        if text < 0:
            raise ValueError(f"the 'clear' attention of a network with {self.num_image_tokens} image tokens got a "
                             f"sequence of {length}; it expects [text; image]")  # fmt: skip
        return text

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        text = self.text_length(q.shape[2])
        if text == 0:
            return super().forward(q, k, v)
        count = self.num_image_tokens
        text_out = F.scaled_dot_product_attention(q[:, :, :text], k, v)  # text queries: every key
        qi, ki, vi = q[:, :, text:], k[:, :, text:], v[:, :, text:]
        pooled = self.global_tokens(ki, vi)
        extra_k = torch.cat([k[:, :, :text], *([pooled[0]] if pooled is not None else [])], dim=2)
        extra_v = torch.cat([v[:, :, :text], *([pooled[1]] if pooled is not None else [])], dim=2)
        path = self.path(count, q.device)
        if path == "gather":
            image_out = gathered_attention(qi, ki, vi, *self.index(count, q.device), extra_k, extra_v)
        elif path == "dense":
            image_out = masked_attention(qi, ki, vi, self.mask(count, q.device), extra_k, extra_v)
        else:
            key = (count, extra_k.shape[2], str(q.device))
            if key not in self._block_masks:
                self._block_masks[key] = flex_block_mask(self.mask(count, q.device), extra_k.shape[2])
            image_out = flex_attention_call(qi, torch.cat([ki, extra_k], dim=2), torch.cat([vi, extra_v], dim=2),
                                            self._block_masks[key])  # fmt: skip
        return torch.cat([text_out, image_out], dim=2)

    def joint_mask(self, length: int, device: torch.device) -> torch.Tensor:
        """The ``(S, S)`` boolean mask (True = attend) over ``[text; image]`` (no pooled tokens)."""
        text = self.text_length(length)
        mask = torch.ones(length, length, dtype=torch.bool, device=device)
        mask[text:, text:] = self.mask(self.num_image_tokens, device)
        return mask

    def map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The ``(B, H, S, S)`` map over ``[text; image]`` keys; only without pooled tokens."""
        if self.text_length(q.shape[2]) == 0:
            return super().map(q, k)
        if self.global_count(self.num_image_tokens):
            raise ValueError("the 'clear' operator with pooled tokens gives no (S, S) attention map")
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        return torch.softmax(scores.masked_fill(~self.joint_mask(q.shape[2], q.device), float("-inf")), dim=-1)

    def macs(self, num_tokens: int, num_heads: int, head_dim: int) -> int:
        """Per image over ``S = num_tokens`` tokens: the image queries' local (and pooled) pairs as ``local``, each
        image query's ``L`` text keys, and the text queries' ``S`` keys each (``q k^T`` and ``attn v``)."""
        text = max(0, num_tokens - self.num_image_tokens)
        if text == 0:
            return super().macs(num_tokens, num_heads, head_dim)
        image = super().macs(self.num_image_tokens, num_heads, head_dim)
        return image + 2 * (self.num_image_tokens * text + text * num_tokens) * num_heads * head_dim

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, image_tokens={self.num_image_tokens}"


def build_clear(config: DiTConfig, options: dict[str, Any]) -> JointLocalAttention:
    check_options(KIND, options, ("radius", "pool", "kernel"))
    if "radius" not in options:
        raise ValueError("the 'clear' attention needs attention_options.radius (e.g. 4 tokens)")
    operator = JointLocalAttention(config.num_tokens, **options)
    if operator.pool > 1:
        operator.check_grid(config.num_tokens)
    return operator


register_operator(KIND, build_clear)
