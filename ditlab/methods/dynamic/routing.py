"""Hard decisions with straight-through gradients, and what every dynamic trunk records about its last call.

Training uses a hard Gumbel-sigmoid: logistic noise on the logits, a sigmoid at temperature ``tau``, a hard
threshold at 0.5 in the forward pass and the soft gradient in the backward pass (DyDiT, Zhao et al. 2025).
Evaluation uses the hard decision ``logit > 0`` (``sigmoid > 0.5``) *directly*: the straight-through expression
``hard - soft.detach() + soft`` is not exactly 1.0 in floating point, so an all-open network would otherwise
drift from the plain DiT.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ditlab.models.trunk import Trunk


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward value ``hard``, gradient of ``soft``."""
    return hard + (soft - soft.detach())


def hard_gumbel_sigmoid(logits: torch.Tensor, temperature: float, training: bool) -> torch.Tensor:
    """Binary masks (1 = on) from ``logits``: noisy and straight-through in training, ``logits > 0`` otherwise."""
    if not training:
        return (logits > 0).to(logits.dtype)
    uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    noise = torch.log(uniform) - torch.log1p(-uniform)  # logistic = difference of two Gumbels
    soft = torch.sigmoid((logits + noise) / temperature)
    return straight_through((soft > 0.5).to(logits.dtype), soft)


def with_always_on(mask: torch.Tensor) -> torch.Tensor:
    """Prepend the unit that is never switched off (head 0, channel group 0): ``(B, K-1) -> (B, K)``."""
    return torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)


@dataclass
class Decisions:
    """What a dynamic trunk decided in its last forward, per sample."""

    saved_macs: torch.Tensor
    """``(B,)`` multiply-accumulates the plain network would have spent and this call did not (differentiable in
    training, through the straight-through masks)."""
    dense_macs: float
    """The denominator of the FLOPs ratio, per image: what the plain network's attention and MLPs spend (DyDiT,
    as its reference) or its whole blocks (the other trunks, whose decisions skip the adaLN linear too)."""
    details: dict[str, torch.Tensor] = field(default_factory=dict)
    """Method-specific decisions for logging (active heads per block, kept tokens, open blocks, ...)."""

    @property
    def ratio(self) -> torch.Tensor:
        """``(B,)`` block FLOPs spent over the plain network's: 1 with everything on."""
        return 1.0 - self.saved_macs / self.dense_macs


ROUTED_BLOCKS = ("dit", "pixart")
"""Block kinds a dynamic trunk routes: one self-attention and one MLP over the image tokens per block (PixArt's
cross-attention to the caption runs in full and is counted in the FLOPs)."""


def plain_blocks(config, kind: str) -> None:
    """Refuse, in one line, a block kind a dynamic trunk cannot route (it narrows the heads, channels and tokens of a
    block's one self-attention and one MLP over the image tokens, through their branches)."""
    if config.block in ROUTED_BLOCKS:
        return
    if config.block in ("mmdit", "flux", "flux-single"):
        raise ValueError(f"the {kind} trunk routes the heads, channels and image tokens of one self-attention and one "
                         f"MLP per block (dit, pixart); {config.block!r} blocks carry [text; image] through a joint "
                         "attention with weights per stream, which it does not split (use block: dit or pixart)")  # fmt: skip
    raise ValueError(f"the {kind} trunk routes the heads, channels and tokens of plain DiT blocks; block "
                     f"{config.block!r} is not one (use block: dit or pixart)")  # fmt: skip


class DynamicTrunk(Trunk):
    """Base of the dynamic trunks: the ``dense`` switch (the complete-model pass of DyDiT's loss runs the plain
    blocks), the evaluation ``form`` (``sliced``: only what is on is computed; ``masked``: everything computed
    and multiplied, the training arithmetic, kept as the reference) and the last call's :class:`Decisions`."""

    forms = ("sliced", "masked")

    def __init__(self) -> None:
        super().__init__()
        self.dense = False
        self.form = "sliced"
        self.last: Decisions | None = None
        self._slices: dict = {}

    def __deepcopy__(self, memo: dict) -> DynamicTrunk:
        """A copy without the last call's record (it holds autograd graphs) or cut slices."""
        clone = self.__class__.__new__(self.__class__)
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            fresh = {"last": None, "_slices": {}}
            clone.__dict__[name] = fresh[name] if name in fresh else copy.deepcopy(value, memo)
        return clone

    def budget_terms(self, decisions: Decisions, dynamic, levels) -> dict[str, torch.Tensor]:
        """This trunk kind's own training terms from its last ``decisions`` (``loss_*`` are added to the loss, the
        rest logged); ``dynamic`` is the module's ``DynamicConfig`` and ``levels()`` the batch's noise levels."""
        return {}

    def set_form(self, form: str) -> None:
        if form not in self.forms:
            raise ValueError(f"unknown form {form!r} for {type(self).__name__}; choices: {list(self.forms)}")
        self.form = form

    def run_plain(self, dit: nn.Module, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Every block on every token (the complete model)."""
        for block in dit.blocks:
            tokens = block(tokens, cond)
        self.last = Decisions(tokens.new_zeros(len(tokens)), self.dense_block_macs(dit, tokens.shape[1]))
        return tokens

    @staticmethod
    def dense_block_macs(dit: nn.Module, num_tokens: int) -> float:
        return float(sum(block.macs(num_tokens, dit.config) for block in dit.blocks))

    def cached(self, key: tuple, build):
        """A slice cut once per key (the key carries the weights' version, so an update cuts it again)."""
        value = self._slices.get(key)
        if value is None:
            if len(self._slices) > 4096:
                self._slices.clear()
            value = self._slices[key] = build()
        return value
