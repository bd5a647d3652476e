"""``magcache``: magnitude-aware reuse of the whole-stack residual (Ma et al., "MagCache: Fast Video Generation
with Magnitude-Aware Cache", arXiv 2506.09045; public code Zehong-Ma/MagCache, and diffusers' ``apply_mag_cache``).

The ratio of the residual's magnitude (``h_L - h_0``, mean per-token norm ratio) between consecutive calls is
calibrated once, on one sample, for the model and schedule. After the first ``warmup`` calls, each call
multiplies the running ratio by its calibrated value and adds ``|1 - running ratio|`` to a running error; while
that error stays at or below ``threshold`` (``<=``, as the reference for FLUX and HunyuanVideo and diffusers;
``strict: true`` is ditlab's earlier ``<``, which configs written before ``strict`` existed keep, and the
reference's Wan 2.1 script uses) and at most ``max_skip`` calls in a row were reused, the call adds the last
computed residual to the fresh embedding, otherwise it computes every block and the running values restart.
The warm-up default rounds ``0.2 * calls`` where the reference truncates it ([interp]; equal at 10 or 50 calls,
one more warm-up call at 8). The decisions depend on the
calibration only, so they are the same for every row. ``threshold: 0`` is the network. On an MM-DiT / FLUX network
the magnitudes are those of the image rows of the residual, as MagCache4FLUX calibrates them, and the residual reused
covers ``[text; image]``, so both streams come from the same computed call (``caches/calibration.py``).

Checked against Zehong-Ma/MagCache at df81cb181776c2c61477c08e1d21f87fda1cd938 (``MagCache4FLUX/magcache_flux.py``,
without its FLUX-only forced step): the full calls of ``tests/methods/sampling/caches/test_reference_schedules.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ditlab.diffusion.cache import knob
from ditlab.methods.sampling.caches.calibration import Calibration
from ditlab.methods.sampling.caches.policy import CachePolicy, register_policy


@dataclass
class MagCacheOptions:
    """MagCache's knobs.

    Args:
        threshold: accumulated magnitude-ratio error allowed before computing (0: the network).
        max_skip: most consecutive reused calls.
        warmup: model calls at the start that always compute; None: a fifth of them (MagCache's retention ratio).
        magnitudes: residual magnitude ratio of every call; None calibrates it on one sample.
        strict: reuse only while the error is below ``threshold`` (``<``) rather than at most it (MagCache: ``<=``).
    """

    threshold: float = knob(0.06, low=0.0)
    max_skip: int = knob(3, low=1)
    warmup: int | None = knob(None, low=0)
    magnitudes: list[float] | None = None
    strict: bool = False

    legacy: ClassVar[dict[str, Any]] = {"strict": True}
    """What a config written before ``strict`` existed meant (read by ``ditlab.diffusion.cache``)."""


@register_policy
class MagCache(CachePolicy):
    """Skip calls while the calibrated residual magnitudes say the residual barely moved."""

    name = "magcache"
    Options = MagCacheOptions
    routed_trunks = True
    calibration_samples = 1

    def validate(self) -> None:
        if self.warmup is None:
            self.warmup = int(0.2 * self.num_calls + 0.5)  # MagCache's retention ratio 0.2 (it truncates: [interp])
        super().validate()
        if self.magnitudes is not None and len(self.magnitudes) != self.num_calls:
            raise ValueError(f"cache.options.magnitudes has {len(self.magnitudes)} entries but this sampler makes "
                             f"{self.num_calls} model calls; calibrate for these steps (leave it unset)")  # fmt: skip

    @property
    def needs_calibration(self) -> bool:
        return self.magnitudes is None and self.threshold > 0

    def calibrate(self, calibration: Calibration) -> None:
        self.magnitudes = calibration.magnitudes()

    def start(self) -> None:
        self.residual: torch.Tensor | None = None
        self.ratio, self.error, self.skipped = 1.0, 0.0, 0

    def reuse(self, call: int) -> bool:
        """MagCache's rule; it advances the running ratio and error, so call it once per call."""
        if call < self.warmup or self.residual is None or self.threshold == 0:
            return False
        if self.magnitudes is None:
            raise ValueError("the magcache policy has no calibrated magnitudes: set cache.options.magnitudes or build it "
                             "with ditlab.methods.sampling.caches.build_policy, which calibrates it on one sample")  # fmt: skip
        self.ratio *= self.magnitudes[call]
        self.skipped += 1
        self.error += abs(1.0 - self.ratio)
        within = self.error < self.threshold if self.strict else self.error <= self.threshold
        if within and self.skipped <= self.max_skip:
            return True
        self.ratio, self.error, self.skipped = 1.0, 0.0, 0
        return False

    def compute(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, call: int) -> torch.Tensor:
        tokens, cond = self.dit.embed(x, t, y)
        if self.reuse(call):
            return self.dit.head(tokens + self.residual, cond)
        out = self.through_blocks(tokens, cond)
        self.residual = out - tokens
        return self.dit.head(out, cond)
