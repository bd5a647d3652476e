"""``teacache``: thresholded reuse of the whole-stack residual (Liu et al., "Timestep Embedding Tells: It's
Time to Cache for Video Diffusion Model", CVPR 2025, arXiv 2411.19108; public code ali-vilab/TeaCache).

The indicator is the relative L1 change of block 0's modulated input between consecutive calls, rescaled by
a polynomial into an estimate of the output's relative change; the rescaled changes accumulate, and a call
computes every block (storing the residual ``h_L - h_0``) once the sum reaches ``threshold``, else it adds the
stored residual to the fresh embedding. The first and the last call always compute. The polynomial is fitted
on this model (``ditlab.methods.sampling.caches.calibration``), never copied from another, and evaluated only within the
input range it was fitted on [interp]; estimates below zero count as zero, so ``threshold: 0`` is the network.
The decision is taken per row (sample and CFG branch), not for the whole batch as in the public code [interp]:
rows that compute are gathered into a smaller batch, so a batch samples what its samples sample one by one.
On PixArt the indicator is block 0's self-attention input under its adaLN-single table; on an MM-DiT / FLUX network
(tokens ``[text; image]``) it is the image stream's modulated input of the first double-stream block, as
TeaCache4FLUX reads it, while the stored residual covers both streams (``caches/calibration.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditlab.diffusion.cache import knob
from ditlab.methods.sampling.caches.calibration import Calibration, block0_modulated_input, relative_l1
from ditlab.methods.sampling.caches.policy import CachePolicy, register_policy


@dataclass
class TeaCacheOptions:
    """TeaCache's knobs.

    Args:
        threshold: accumulated rescaled input change that triggers a computed call (0: the network).
        coefficients: rescaling polynomial (highest power first); None fits it on this model.
    """

    threshold: float = knob(0.1, low=0.0)
    coefficients: list[float] | None = None


@register_policy
class TeaCache(CachePolicy):
    """Accumulated, rescaled input change decides, per row, when to recompute the residual."""

    name = "teacache"
    Options = TeaCacheOptions
    routed_trunks = True
    calibration_samples = 4

    @property
    def needs_calibration(self) -> bool:
        return self.coefficients is None and self.threshold > 0

    def calibrate(self, calibration: Calibration) -> None:
        self.coefficients = calibration.coefficients()
        self.input_range = calibration.input_range()

    input_range: tuple[float, float] | None = None
    """Input changes are clamped to the range the polynomial was fitted on (None: given coefficients, no clamp)."""

    def start(self) -> None:
        self.previous: torch.Tensor | None = None
        self.accumulated: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

    def rescaled(self, change: torch.Tensor) -> torch.Tensor:
        if self.coefficients is None:
            raise ValueError("the teacache policy has no rescaling polynomial: set cache.options.coefficients or build it "
                             "with ditlab.methods.sampling.caches.build_policy, which fits one on this model")  # fmt: skip
        if self.input_range is not None:
            change = change.clamp(*self.input_range)
        estimate = torch.zeros_like(change)
        for coefficient in self.coefficients:  # Horner, highest power first
            estimate = estimate * change + coefficient
        return estimate.clamp_min(0)

    def compute(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        tokens, cond = self.dit.embed(x, t, y)
        indicator = block0_modulated_input(self.dit, tokens, cond)
        if self.previous is None or call == self.num_calls - 1 or self.threshold == 0:
            compute = torch.ones(len(x), dtype=torch.bool, device=x.device)
            self.accumulated = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        else:
            self.accumulated = self.accumulated + self.rescaled(relative_l1(indicator, self.previous).double())
            compute = self.accumulated >= self.threshold
        self.previous = indicator
        self.accumulated = torch.where(compute, 0.0, self.accumulated)
        rows = compute.nonzero().flatten()
        if len(rows) == len(x):
            out = self.through_blocks(tokens, cond)
            self.residual = out - tokens
        else:
            out = tokens + self.residual
            if len(rows):
                fresh = self.through_blocks(tokens[rows], cond[rows], t=t[rows])
                out = out.index_copy(0, rows, fresh)
                self.residual = self.residual.index_copy(0, rows, fresh - tokens[rows])
        return self.dit.head(out, cond)
