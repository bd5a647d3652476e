"""``toca``: token-wise reuse in the style of ToCa (Zou et al., "Accelerating Diffusion Transformers with
Token-wise Feature Caching", ICLR 2025, arXiv 2410.05317; public code Shenyi-Z/ToCa).

Full calls as FORA (the first ``warmup`` and then every ``interval``). On the calls in between, attention is
reused whole (ToCa's shipped DiT schedules give the attention module a recompute share of zero) and each block's
MLP is recomputed for the ``ratio`` share of tokens whose MLP input moved most since their cached output was
computed (relative L2 change); the fresh outputs and inputs are scattered back into the cache. ToCa scores
tokens by attention-map column sums, which needs an explicit attention map and so cannot run on fused
attention; the input-drift score here is ours [interp] (DuCa reports that the choice of tokens matters little).
``ratio: 0`` is FORA; ``interval: 1`` is the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditlab.diffusion.cache import knob
from ditlab.methods.sampling.caches.fora import BranchCache
from ditlab.methods.sampling.caches.policy import register_policy
from ditlab.models.taps import Branch


@dataclass
class ToCaOptions:
    """ToCa's knobs.

    Args:
        interval: compute every branch every this many model calls (1: the network).
        ratio: share of tokens whose MLP is recomputed on a cached call (0: fora).
        warmup: model calls at the start that always compute.
    """

    interval: int = knob(3, low=1)
    ratio: float = knob(0.25, low=0.0, high=1.0)
    warmup: int = knob(0, low=0)


@register_policy
class ToCa(BranchCache):
    """Attention reused, MLP recomputed on the most-changed tokens between full calls."""

    name = "toca"
    Options = ToCaOptions

    def start(self) -> None:
        super().start()
        self.mlp_inputs: dict[int, torch.Tensor] = {}

    def store(self, branch: Branch) -> torch.Tensor:
        if branch.kind != "mlp":
            return super().store(branch)
        inputs = branch.inputs()
        output = branch.fn(inputs)
        self.cache[branch.unit], self.mlp_inputs[branch.unit] = output, inputs
        self.counted(len(output), 1)
        return output

    def cached(self, branch: Branch) -> torch.Tensor:
        if branch.kind != "mlp":
            return self.recall(branch)
        cached = self.cache[branch.unit]
        fresh_tokens = round(self.ratio * cached.shape[1])
        if fresh_tokens == 0:
            return cached
        inputs, before = branch.inputs(), self.mlp_inputs[branch.unit]
        drift = (inputs - before).norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-12)
        chosen = drift.topk(fresh_tokens, dim=1).indices.unsqueeze(-1).expand(-1, -1, inputs.shape[-1])
        chosen_inputs = inputs.gather(1, chosen)
        fresh = branch.fn(chosen_inputs)
        output = cached.scatter(1, chosen.expand(-1, -1, fresh.shape[-1]), fresh)
        self.cache[branch.unit] = output
        self.mlp_inputs[branch.unit] = before.scatter(1, chosen, chosen_inputs)
        self.counted(len(output), fresh_tokens / cached.shape[1])
        return output
