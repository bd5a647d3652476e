"""Inner Loop Feedback at sampling time: a feedback block predicts a block's next-step features, so most steps run
only the blocks after it.

ILF (Gwilliam et al., "Accelerate High-Quality Diffusion Models with Inner Loop Feedback", arXiv 2501.13107; no
public code) trains a copy of one backbone block, scaled by a zero-initialised factor, to predict *future* features
from a chosen block's output. Our reading of the wiring [interp: the paper's figure, not code]:

- a full call runs the network and keeps ``h``, the output of the source block ``j``;
- a feedback call predicts ``h_hat = h + gamma * F(h, c)``, with ``c`` the condition of *this* call (its time), and
  runs only blocks ``r .. L-1`` and the head on ``h_hat``; ``r`` (``reentry``) defaults to ``j + 1``; ``r <= j``
  re-runs blocks ``r .. j`` on the prediction (an inner loop); consecutive feedback calls chain, each predicting
  from the last ``h_hat``.

With ``gamma = 0`` a feedback call reuses ``h`` as it is: front-range feature reuse, the paper's caching baseline
(and, with no feedback block at all, exactly that baseline). A feedback call costs ``(L - r + 1) / L`` of a full
call (the blocks run plus the feedback block).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ditlab.methods.sampling.caches.policy import CachePolicy
from ditlab.models.dit import DiT, DiTBlock


class FeedbackBlock(nn.Module):
    """``h + gamma * F(h, c)``: ``F`` a copy of a backbone block (or a re-initialised one), ``gamma`` a scalar.

    Args:
        block: the source block to copy.
        gamma: the scale's initial value (ILF: 0, so training starts from feature reuse).
        init: ``copy`` the block's weights, or ``random`` (re-initialise it the way DiT initialises blocks).
    """

    def __init__(self, block: DiTBlock, gamma: float = 0.0, init: str = "copy") -> None:
        super().__init__()
        self.block = copy.deepcopy(block).requires_grad_(True).train()
        if init == "random":
            for module in self.block.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
        elif init != "copy":
            raise ValueError(f"model.feedback.init={init!r}; choices: copy, random")
        self.gamma = nn.Parameter(torch.tensor(float(gamma)))

    def forward(self, hidden: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return hidden + self.gamma * self.block(hidden, cond)


class FeedbackPolicy(CachePolicy):
    """Full calls on ``warmup`` and every ``interval``-th call after; feedback calls in between (see the notes).

    ``feedback`` None reuses the source block's features unchanged (the caching baseline).
    """

    name = "feedback"
    defaults = {"source": 5, "reentry": None, "interval": 2, "warmup": 0}

    def __init__(self, dit: DiT, schedule: torch.Tensor, feedback: FeedbackBlock | None = None, **settings) -> None:
        self.feedback = feedback
        super().__init__(dit, schedule, **settings)

    def validate(self) -> None:
        super().validate()
        check_wiring(self.source, self.reentry, self.depth)
        self.reentry = self.source + 1 if self.reentry is None else self.reentry

    def start(self) -> None:
        self.hidden: torch.Tensor | None = None

    def full_call(self, call: int) -> bool:
        return call < self.warmup or (call - self.warmup) % self.interval == 0

    def compute(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        tokens, cond = self.dit.embed(x, t, y)
        if self.full_call(call) or self.hidden is None:
            self.hidden = self.through_blocks(tokens, cond, range(self.source + 1))
            tokens = self.through_blocks(self.hidden, cond, range(self.source + 1, self.depth))
            return self.dit.head(tokens, cond)
        if self.feedback is not None:
            self.hidden = self.feedback(self.hidden, cond)
            self.counted(len(tokens), 2)
        tokens = self.through_blocks(self.hidden, cond, range(self.reentry, self.depth))
        return self.dit.head(tokens, cond)


def check_wiring(source: int, reentry: int | None, depth: int) -> None:
    """One line for a source block or re-entry point that does not fit a ``depth``-block network."""
    if not 0 <= source < depth - 1:
        raise ValueError(f"feedback source block {source} must be in [0, {depth - 2}] for a {depth}-block network "
                         "(a later block leaves nothing to run after it)")  # fmt: skip
    if reentry is not None and not 0 <= reentry <= source + 1:
        raise ValueError(f"feedback re-entry block {reentry} must be in [0, {source + 1}] (at most one past the "
                         f"source block {source})")  # fmt: skip
