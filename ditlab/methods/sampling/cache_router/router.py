"""The learned router: one ``[model calls, units]`` parameter whose sigmoid says how much each branch is recomputed.

Learning-to-Cache (Ma et al., NeurIPS 2024; horseee/learning-to-cache) and HarmoniCa (Huang et al., ICML 2025;
ModelTC/HarmoniCa) give every sampling step its own input-independent score per attention / MLP branch,
``s = sigmoid(theta)``. Here all steps live in one parameter, so every training step touches the same tensor and
DDP needs no unused-parameter search. Rows that must always compute (HarmoniCa's first step, L2C's full steps) are
*frozen*: their score is exactly 1, they get no gradient, and :meth:`StepUnitRouter.clamp_` pins them at the
clamp value. Columns are the network's units in the trunk's global numbering (``DiT.units()``, ``branch.unit``): a
DiT block's attention then MLP, ``2 * block + (0 attention, 1 MLP)``; a PixArt block's self-attention,
cross-attention and MLP (three per block); an MM-DiT block's joint attention and two-stream MLP.
"""

from __future__ import annotations

import torch
from torch import nn


class StepUnitRouter(nn.Module):
    """Scores ``[calls, units]``; ``frozen`` rows always compute.

    Args:
        calls: model calls per trajectory (the sampler's schedule).
        depth: blocks of the network.
        frozen: indices of rows that always compute.
        clamp: theta is clamped to ``[-clamp, clamp]`` after every update (L2C, HarmoniCa: 5).
        init: ``normal`` (L2C: N(0, 1)) or ``constant`` (``init_value`` everywhere).
        init_value: the constant for ``init: constant``.
        seed: the normal initialisation's seed.
        units: the network's units (``len(dit.units())``); None: ``2 * depth``, a DiT's.
    """

    def __init__(self, calls: int, depth: int, frozen: list[int], clamp: float = 5.0, init: str = "normal",
                 init_value: float = 0.0, seed: int = 0, units: int | None = None) -> None:  # fmt: skip
        super().__init__()
        width = 2 * depth if units is None else int(units)
        if init == "normal":
            theta = torch.randn(calls, width, generator=torch.Generator().manual_seed(seed))
        elif init == "constant":
            theta = torch.full((calls, width), float(init_value))
        else:
            raise ValueError(f"model.router.init={init!r}; choices: normal, constant")
        self.clamp_value = float(clamp)
        self.theta = nn.Parameter(theta)
        mask = torch.zeros(calls, dtype=torch.bool)
        mask[list(frozen)] = True
        self.register_buffer("frozen", mask, persistent=False)  # derived from the mode: not part of the router
        self.clamp_()

    @property
    def calls(self) -> int:
        return self.theta.shape[0]

    @property
    def units(self) -> int:
        return self.theta.shape[1]

    def scores(self) -> torch.Tensor:
        """``[calls, units]`` in (0, 1); frozen rows exactly 1 (and no gradient reaches their theta)."""
        return torch.where(self.frozen[:, None], torch.ones_like(self.theta), torch.sigmoid(self.theta))

    @torch.no_grad()
    def clamp_(self) -> None:
        """After each update: theta into ``[-clamp, clamp]``, frozen rows pinned at ``+clamp``."""
        self.theta.clamp_(-self.clamp_value, self.clamp_value)
        self.theta[self.frozen] = self.clamp_value

    @torch.no_grad()
    def computes(self, threshold: float) -> torch.Tensor:
        """The static plan at ``threshold``: ``[calls, units]`` booleans, a unit computed iff its score exceeds it."""
        return self.scores() > threshold
