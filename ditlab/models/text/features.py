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
    null: TextFeatures | None = None
    """The empty caption's features ``(1, L, D)`` from the same encoder: the unconditional rows of classifier-free
    guidance and of caption drop-out (set by :meth:`TextEncoder.forward`, kept by indexing, ``to`` and ``cat``)."""

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
        return TextFeatures(self.tokens[index], self.pooled[index], self.mask[index], self.null)

    def null_rows(self, batch: int | None = None) -> TextFeatures:
        """``batch`` (default: as many as these) rows of the empty caption; refused when the encoder gave none."""
        if self.null is None:
            raise ValueError("these text features carry no empty-caption features for guidance or caption drop-out; "
                             "encode them with a ditlab TextEncoder (it adds them) or set TextFeatures.null")  # fmt: skip
        count = len(self) if batch is None else batch
        null = self.null
        return TextFeatures(null.tokens.expand(count, -1, -1), null.pooled.expand(count, -1),
                            null.mask.expand(count, -1), null)  # fmt: skip

    def where(self, drop: torch.Tensor) -> TextFeatures:
        """Rows where ``drop: (B,)`` is true replaced by the empty caption (caption drop-out, forced null rows)."""
        null = self.null_rows()
        keep = ~drop.to(self.tokens.device).bool()
        return TextFeatures(torch.where(keep[:, None, None], self.tokens, null.tokens.to(self.tokens)),
                            torch.where(keep[:, None], self.pooled, null.pooled.to(self.pooled)),
                            torch.where(keep[:, None], self.mask, null.mask.to(self.mask.device)), self.null)  # fmt: skip

    def to(self, *args, **kwargs) -> TextFeatures:
        """Tokens and pooled as ``Tensor.to(*args, **kwargs)``; the mask moves device only and stays bool."""
        tokens, pooled = self.tokens.to(*args, **kwargs), self.pooled.to(*args, **kwargs)
        null = self.null.to(*args, **kwargs) if self.null is not None else None
        return TextFeatures(tokens, pooled, self.mask.to(tokens.device), null)

    @staticmethod
    def cat(parts: Sequence[TextFeatures]) -> TextFeatures:
        """Rows of ``parts`` stacked (e.g. conditional and null halves of a guided batch); lengths must agree."""
        if not parts:
            raise ValueError("TextFeatures.cat needs at least one part")
        lengths = {part.tokens.shape[1:] for part in parts}
        if len(lengths) != 1:
            raise ValueError(f"cannot stack text features of different shapes {sorted(lengths)}; encode them together")
        return TextFeatures(torch.cat([p.tokens for p in parts]), torch.cat([p.pooled for p in parts]),
                            torch.cat([p.mask for p in parts]), parts[0].null)  # fmt: skip


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
        features = self.encode(captions)
        if features.null is None:
            if self._null is None or self._null.tokens.device != features.tokens.device:
                self._null = self.encode([""])
            features.null = self._null
        return features

    _null: TextFeatures | None = None

    def null(self, batch: int = 1) -> TextFeatures:
        """The guidance null condition: ``batch`` empty captions."""
        return self([""] * batch)
