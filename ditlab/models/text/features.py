"""What a text encoder hands a text-conditioned DiT: per-token embeddings, a pooled vector and a padding mask.

Text-to-image DiTs read text in one of two forms: PixArt cross-attends to every token (T5's token
embeddings with their mask), SD3/FLUX add a pooled vector (CLIP's end-of-text embedding) to the timestep
condition. One :class:`TextFeatures` carries both, so every block kind reads the same object. The empty
caption ``""`` is the null condition of classifier-free guidance (as PixArt and SD3 encode it), so guidance
needs no learned null token: :meth:`TextEncoder.null` encodes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TextFeatures:
    """``tokens (B, L, D)``, ``pooled (B, P)`` and ``mask (B, L)`` (bool, True for a real token, False for padding)."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        batch, length = self.tokens.shape[:2] if self.tokens.dim() == 3 else (-1, -1)
        if self.tokens.dim() != 3 or self.pooled.shape[:1] != (batch,) or self.pooled.dim() != 2:
            raise ValueError(f"text features need tokens (B, L, D) and pooled (B, P); got {tuple(self.tokens.shape)} "
                             f"and {tuple(self.pooled.shape)}")  # fmt: skip
        if self.mask.shape != (batch, length) or self.mask.dtype != torch.bool:
            raise ValueError(f"text mask must be bool (B, L) = {(batch, length)}; got {self.mask.dtype} "
                             f"{tuple(self.mask.shape)}")  # fmt: skip

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index) -> TextFeatures:
        """Rows ``index`` (an int keeps the batch dimension), e.g. one process's share of a batch."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TextFeatures(self.tokens[index], self.pooled[index], self.mask[index])

    def to(self, *args, **kwargs) -> TextFeatures:
        """Tokens and pooled as ``Tensor.to(*args, **kwargs)``; the mask moves device only and stays bool."""
        tokens, pooled = self.tokens.to(*args, **kwargs), self.pooled.to(*args, **kwargs)
        return TextFeatures(tokens, pooled, self.mask.to(tokens.device))

    @staticmethod
    def cat(parts: Sequence[TextFeatures]) -> TextFeatures:
        """Rows of ``parts`` stacked (e.g. conditional and null halves of a guided batch); lengths must agree."""
        if not parts:
            raise ValueError("TextFeatures.cat needs at least one part")
        lengths = {part.tokens.shape[1:] for part in parts}
        if len(lengths) != 1:
            raise ValueError(f"cannot stack text features of different shapes {sorted(lengths)}; encode them together")
        return TextFeatures(torch.cat([p.tokens for p in parts]), torch.cat([p.pooled for p in parts]),
                            torch.cat([p.mask for p in parts]))  # fmt: skip


class TextEncoder(nn.Module):
    """A frozen text encoder: ``encoder(captions: list[str]) -> TextFeatures``.

    Subclasses set ``name``, ``dim`` (token width), ``pooled_dim`` and ``max_length`` and implement
    :meth:`encode`; the base checks the input, runs without gradients and stays in eval mode.
    """

    name: str = "text"
    dim: int = 0
    pooled_dim: int = 0
    max_length: int = 0

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters()), torch.empty(0)).device

    def encode(self, captions: list[str]) -> TextFeatures:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> TextFeatures:
        if isinstance(captions, str):
            raise ValueError(f"text encoder {self.name} takes a list of captions, not one string; wrap it: [caption]")
        captions = list(captions)
        bad = [type(c).__name__ for c in captions if not isinstance(c, str)]
        if bad:
            raise ValueError(f"text encoder {self.name} takes captions as str; got {bad[0]}")
        return self.encode(captions)

    def null(self, batch: int = 1) -> TextFeatures:
        """The guidance null condition: ``batch`` empty captions."""
        return self([""] * batch)
