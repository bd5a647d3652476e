"""``random-words``: a frozen text encoder of fixed random word vectors, for quick runs and as an ablation baseline.

Each CLIP-BPE token gets a fixed Gaussian vector (seeded, so every process and run builds the same table) plus the
1-D sin-cos embedding of its position, so word order is visible to the network; the pooled vector is the mean over
the caption's tokens. It needs no training and no download: tests, smoke runs and "does a learned text encoder
matter?" ablations use it where a real run uses the scene CLIP, CLIP-L or T5.
"""

from __future__ import annotations

import numpy as np
import torch

from ditlab.models.positions import sincos_1d
from ditlab.models.text.features import TextEncoder, TextFeatures
from ditlab.models.text.registry import register_text_encoder
from ditlab.models.text.tokenizer import Tokenizer


class RandomWords(TextEncoder):
    """``captions -> TextFeatures(tokens (B, L, dim), pooled (B, dim), mask)`` from a fixed random table."""

    name = "random-words"

    def __init__(self, dim: int = 64, context_length: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.tokenizer = Tokenizer(context_length)
        self.dim, self.pooled_dim, self.max_length = dim, dim, context_length
        table = torch.randn(self.tokenizer.vocab_size, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("table", table / dim**0.5)
        positions = sincos_1d(dim, np.arange(context_length, dtype=np.float64))
        self.register_buffer("positions", torch.from_numpy(positions).float() * 0.1)

    def encode(self, captions: list[str]) -> TextFeatures:
        ids, mask = self.tokenizer(captions)
        ids, mask = ids.to(self.table.device), mask.to(self.table.device)
        tokens = (self.table[ids] + self.positions) * mask[..., None]
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True)
        return TextFeatures(tokens, pooled, mask)


@register_text_encoder("random-words")
def random_words(dim: int = 64, context_length: int = 32, seed: int = 0) -> RandomWords:
    return RandomWords(dim, context_length, seed)
