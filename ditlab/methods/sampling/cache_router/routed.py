"""Routed model calls, as training and the image-error proxy run them.

A routed call blends each branch's fresh pre-gate output with the one cached from earlier calls,
``s * fresh + (1 - s) * cached`` (gates recomputed from the current condition), so the loss is differentiable in the
router's scores. The cache entry of a unit is refreshed, detached, only where ``s > threshold``, the way the
exported plan refreshes it at inference, so the cache a training rollout carries from step to step is the one
sampling will carry [interp: HarmoniCa's step-wise training keeps stale entries across steps; refreshing them
by the inference rule is our reading]. On the first call there is no cache and every branch is computed; when the
rows change (a guidance interval switches ``[cond; uncond]`` on or off) the cache is dropped and the call computes
every branch, as the exported plan does (``ditlab.methods.sampling.caches.policy``). Rollouts step through the
sampler's own trajectory (``ditlab.diffusion.trajectory``).
"""

from __future__ import annotations

import torch

from ditlab.models.dit import DiT
from ditlab.models.taps import Branch, run_block_range

Cache = dict[tuple[int, str], torch.Tensor]


def routed_call(dit: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, cache: Cache,
                threshold: float) -> torch.Tensor:  # fmt: skip
    """The network output with every branch blended by ``scores`` (``(units,)`` or one row per input row
    ``(rows, units)``, columns in the network's unit numbering, ``branch.unit``) against ``cache``, which is refreshed
    in place (see the module notes). ``y`` is the network's condition input (labels or ``TextFeatures``); on an
    MM-DiT a unit's entry holds both streams of ``[text; image]``, blended and refreshed together."""
    if any(len(value) != len(x) for value in cache.values()):
        cache.clear()  # guidance switched on or off: no cached row fits the new layout

    def blend(branch: Branch) -> torch.Tensor:
        key = (branch.block, branch.kind)
        fresh = branch.compute()
        cached = cache.get(key)
        if cached is None:
            cache[key] = fresh.detach()
            return fresh
        score = scores[..., branch.unit]
        score = score.reshape(-1, 1, 1) if score.ndim else score
        cache[key] = torch.where(score > threshold, fresh, cached).detach()
        return score * fresh + (1 - score) * cached

    tokens, cond = dit.embed(x, t, y)
    return dit.head(run_block_range(dit, tokens, cond, branches=blend), cond)
