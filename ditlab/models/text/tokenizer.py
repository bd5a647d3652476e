"""CLIP's byte-pair-encoding tokenizer (Radford et al., 2021, "Learning Transferable Visual Models From Natural
Language Supervision"), offline.

open_clip ships the BPE merges file (49,408 tokens, the vocabulary of OpenAI's CLIP and of the CLIP-L text
encoder SD3 and FLUX use) inside its wheel, so tokenizing never touches the network. Captions are lower-cased
and whitespace-normalised, wrapped in start/end-of-text tokens, cut to ``context_length`` (the last kept token
becoming end-of-text, as CLIP does) and padded with ``pad_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def _bpe():
    """open_clip's ``SimpleTokenizer`` (reading the merges file costs ~0.2 s: once per process)."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as error:
        raise ModuleNotFoundError("the CLIP tokenizer needs open_clip: pip install open_clip_torch") from error
    return SimpleTokenizer(context_length=None)


class Tokenizer:
    """``tokenizer(captions) -> (ids (B, L) long, mask (B, L) bool)``; the mask covers start..end-of-text.

    Args:
        context_length: ``L`` (77 for CLIP-L).
        pad_id: the padding id: 0 as open_clip pads, or the end-of-text id as Hugging Face's CLIP tokenizers do.
    """

    def __init__(self, context_length: int = 77, pad_id: int = 0) -> None:
        if context_length < 2:
            raise ValueError(f"context_length={context_length} leaves no room for start and end-of-text; use >= 2")
        self.context_length, self.pad_id = context_length, pad_id
        bpe = _bpe()
        self.vocab_size, self.sot_id, self.eot_id = bpe.vocab_size, bpe.sot_token_id, bpe.eot_token_id

    def encode(self, caption: str) -> list[int]:
        """The caption's BPE ids, without start/end-of-text and never truncated."""
        return _bpe().encode(caption)

    def lengths(self, captions: Sequence[str]) -> list[int]:
        """Tokens each caption needs with start and end-of-text (longer than ``context_length``: truncated)."""
        return [len(self.encode(caption)) + 2 for caption in captions]

    def __call__(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            raise ValueError("the tokenizer takes a list of captions, not one string; wrap it: [caption]")
        ids = torch.full((len(captions), self.context_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(captions), self.context_length, dtype=torch.bool)
        for row, caption in enumerate(captions):
            tokens = [self.sot_id, *self.encode(caption)][: self.context_length - 1] + [self.eot_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = True
        return ids, mask

    def decode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str]:
        """Captions back from ``ids (B, L)`` (special tokens and padding dropped; text as the tokenizer cleaned it)."""
        special, rows = {self.sot_id, self.eot_id}, []
        for row, tokens in enumerate(ids.tolist()):
            if mask is not None:
                tokens = [token for token, valid in zip(tokens, mask[row].tolist()) if valid]
            elif self.eot_id in tokens:
                tokens = tokens[: tokens.index(self.eot_id)]
            rows.append(_bpe().decode([token for token in tokens if token not in special]).strip())
        return rows
