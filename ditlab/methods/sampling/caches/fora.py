"""``fora``: Fast-Forward Caching (Selvaraju et al., "FORA: Fast-Forward Caching in Diffusion Transformer
Acceleration", arXiv 2407.01425; public code prathebaselva/FORA).

Every block's attention and MLP outputs, taken before their gates, are computed on the first call and then
every ``interval`` calls, and reused in between; the adaLN gates and the norms are recomputed from the current
condition and tokens at every call, so a reused branch is re-weighted for the current step. The plan is static:
call ``k`` computes when ``k < warmup`` or ``(k - warmup) % interval == 0``. ``interval: 1`` is the network.
"""

from __future__ import annotations

import torch

from ditlab.methods.sampling.caches.policy import CachePolicy, register_policy
from ditlab.models.taps import Branch


class BranchCache(CachePolicy):
    """Shared by the branch-level policies: a static plan of full calls and one stored output per branch."""

    def start(self) -> None:
        self.cache: dict[tuple[int, str], torch.Tensor] = {}

    def full_call(self, call: int) -> bool:
        return call < self.warmup or (call - self.warmup) % self.interval == 0

    def compute(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        tokens, cond = self.dit.embed(x, t, y)
        self.time = self.times[call]
        hook = self.store if self.full_call(call) or not self.cache else self.cached
        return self.dit.head(self.through_blocks(tokens, cond, hook=hook), cond)

    def store(self, branch: Branch) -> torch.Tensor:
        output = branch.compute()
        self.cache[branch.block, branch.kind] = output
        self.counted(len(output), 1)
        return output

    def cached(self, branch: Branch) -> torch.Tensor:
        """A branch's output on a call that does not compute it (subclasses: reuse, forecast, partial)."""
        raise NotImplementedError


@register_policy
class Fora(BranchCache):
    """Static-interval reuse of every branch's pre-gate output."""

    name = "fora"
    defaults = {"interval": 3, "warmup": 0}

    def cached(self, branch: Branch) -> torch.Tensor:
        return self.cache[branch.block, branch.kind]
