"""``toca``: token-wise reuse in the style of ToCa (Zou et al., "Accelerating Diffusion Transformers with
Token-wise Feature Caching", ICLR 2025, arXiv 2410.05317; public code Shenyi-Z/ToCa).

Full calls as FORA (the first ``warmup`` and then every ``interval``). On the calls in between, attention is
reused whole (ToCa's shipped DiT schedules give the attention module a recompute share of zero) and each block's
MLP is recomputed for the ``ratio`` share of tokens whose MLP input moved most since their cached output was
computed (relative L2 change); the fresh outputs and inputs are scattered back into the cache. ToCa scores
tokens by attention-map column sums, which needs an explicit attention map and so cannot run on fused
attention; the input-drift score here is ours [interp] (DuCa reports that the choice of tokens matters little).
``ratio: 0`` is FORA; ``interval: 1`` is the network.

On the text-to-image blocks every per-token branch is refreshed token-wise: the MLP, and PixArt's cross-attention,
whose output for an image token depends on that token and the (fixed) caption only, as ToCa caches PixArt-alpha's
cross-attention token by token [interp: the same ``ratio`` for both]. An MM-DiT block's MLP branch is two MLPs, one
per stream of ``[text; image]``: each stream refreshes the ``ratio`` share of its own tokens through its own MLP, on
the same calls, so the text and image streams are cached alike and never mixed.
"""

from __future__ import annotations

from collections.abc import Callable
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
        self.mlp_inputs: dict[int, torch.Tensor] = {}  # the inputs of every token-wise branch's cached output

    def store(self, branch: Branch) -> torch.Tensor:
        if branch.kind not in TOKENWISE:
            return super().store(branch)
        inputs = branch.inputs()
        output = branch.fn(inputs)
        self.cache[branch.unit], self.mlp_inputs[branch.unit] = output, inputs
        self.counted(len(output), 1)
        return output

    def cached(self, branch: Branch) -> torch.Tensor:
        if branch.kind not in TOKENWISE:
            return self.recall(branch)
        cached = self.cache[branch.unit]
        parts = [(part, fn, round(self.ratio * (part.stop - part.start))) for part, fn in
                 token_parts(branch, cached.shape[1])]  # fmt: skip
        if not any(count for _, _, count in parts):
            return cached
        inputs, before = branch.inputs(), self.mlp_inputs[branch.unit]
        output, kept = cached, before
        for part, fn, count in parts:
            if count == 0:
                continue
            now, then = inputs[:, part], before[:, part]
            drift = (now - then).norm(dim=-1) / then.norm(dim=-1).clamp_min(1e-12)
            chosen = drift.topk(count, dim=1).indices.unsqueeze(-1).expand(-1, -1, inputs.shape[-1])
            chosen_inputs = now.gather(1, chosen)
            fresh = fn(chosen_inputs)
            where = chosen + part.start
            output = output.scatter(1, where.expand(-1, -1, fresh.shape[-1]), fresh)
            kept = kept.scatter(1, where, chosen_inputs)
        self.cache[branch.unit], self.mlp_inputs[branch.unit] = output, kept
        self.counted(len(output), sum(count for _, _, count in parts) / cached.shape[1])
        return output


TOKENWISE = ("mlp", "cross_attention")
"""Branch kinds whose output for a token depends on that token alone (and the condition): refreshed token-wise."""


def token_parts(branch: Branch, width: int) -> list[tuple[slice, Callable[[torch.Tensor], torch.Tensor]]]:
    """The token ranges of a token-wise branch's ``width`` output rows, each with the function that computes a
    subset of its tokens: the whole range with ``branch.fn``, or for an MM-DiT block's two-stream MLP (its
    ``stream_mlps``, which splits ``[text; image]`` by position) the text rows with the text MLP and the image rows with
    the image MLP."""
    owner = getattr(branch.fn, "__self__", None)
    split = getattr(type(owner), "stream_mlps", None)
    if split is not None and getattr(branch.fn, "__func__", None) is split and width > owner.num_tokens:
        length = width - owner.num_tokens
        return [(slice(0, length), owner.context_mlp), (slice(length, width), owner.mlp)]
    return [(slice(0, width), branch.fn)]
