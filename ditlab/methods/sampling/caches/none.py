"""``none``: the reference policy. Every call runs the whole network through the same block loop the caches
use, so it samples bit-for-bit what the plain network samples and gives the work counters their baseline."""

from __future__ import annotations

import torch

from ditlab.methods.sampling.caches.policy import CachePolicy, register_policy


@register_policy
class NoCache(CachePolicy):
    """Computes everything at every call."""

    name = "none"
    routed_trunks = True

    def compute(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        tokens, cond = self.dit.embed(x, t, y)
        return self.dit.head(self.through_blocks(tokens, cond), cond)
