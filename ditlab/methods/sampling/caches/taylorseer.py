"""``taylorseer``: forecast features instead of reusing them (Liu et al., "From Reusing to Forecasting:
Accelerating Diffusion Models with TaylorSeers", ICCV 2025, arXiv 2503.06923; public code Shenyi-Z/TaylorSeer).

The units are FORA's (every block's attention and MLP output before its gate), computed on the first
``warmup`` calls and then every ``interval`` calls counted from the last warm-up call, as the reference's
``first_enhance`` / ``cal_type`` do (``warmup: 2, interval: 4``: calls 0, 1, 5, 9, ...); ``count_from: after_warmup``
is ditlab's earlier plan, counted from the first call after warm-up (0, 1, 2, 6, 10, ...), which configs written
before ``count_from`` existed keep. Each computed unit also updates finite-difference estimates
of its derivatives in the network time ``t``, ``D_{i+1} = (D_i(now) - D_i(before)) / (t_now - t_before)``, up to
``order``; a call in between forecasts ``f(t) = sum_i D_i (t - t_full)^i / i!`` with the orders the computed
calls so far support. Differences are taken in the network time rather than the step index [interp], so uneven
schedules forecast correctly; a sampler that calls the network twice at one time (Heun) is refused. ``order: 0``
with ``count_from: after_warmup`` is FORA with ``align: start``, and ``interval: 1`` is the network.

Checked against Shenyi-Z/TaylorSeer at 288776dfd0cbb6e201c654c31cd22139f848a6cf
(``TaylorSeer-DiT/cache_functions/cal_type.py``): the full calls of
``tests/methods/sampling/caches/test_reference_schedules.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ditlab.diffusion.cache import knob
from ditlab.methods.sampling.caches.fora import BranchCache
from ditlab.methods.sampling.caches.policy import register_policy
from ditlab.models.taps import Branch


@dataclass
class TaylorSeerOptions:
    """TaylorSeer's knobs.

    Args:
        interval: compute every branch every this many model calls (1: the network).
        order: order of the Taylor forecast (0 reuses, as fora).
        warmup: model calls at the start that always compute (TaylorSeer's ``first_enhance``).
        count_from: ``last_warmup`` (TaylorSeer: the interval runs from the last warm-up call) or ``after_warmup``
            (ditlab's earlier plan: from the first call after warm-up, one more full call at the start).
    """

    interval: int = knob(4, low=1)
    order: int = knob(1, low=0, high=4)
    warmup: int = knob(2, low=0)
    count_from: str = "last_warmup"

    legacy: ClassVar[dict[str, Any]] = {"count_from": "after_warmup"}
    """What a config written before ``count_from`` existed meant (read by ``ditlab.diffusion.cache``)."""


@register_policy
class TaylorSeer(BranchCache):
    """Taylor-series forecast of every branch's pre-gate output between computed calls."""

    name = "taylorseer"
    Options = TaylorSeerOptions
    repeated_times = False

    def validate(self) -> None:
        super().validate()
        if self.count_from not in ("last_warmup", "after_warmup"):
            raise ValueError(f"cache.options.count_from={self.count_from!r} is not a choice of the taylorseer "
                             "policy; choices: last_warmup (TaylorSeer), after_warmup")  # fmt: skip

    def full_call(self, call: int) -> bool:
        if self.count_from == "after_warmup":
            return super().full_call(call)
        last = max(1, self.warmup) - 1  # call 0 always computes: there is nothing to forecast from
        return call <= last or (call - last) % self.interval == 0

    def start(self) -> None:
        super().start()
        self.derivatives: dict[int, list[torch.Tensor]] = {}
        self.computed_at: dict[int, float] = {}

    def store(self, branch: Branch) -> torch.Tensor:
        output = super().store(branch)
        key = branch.unit
        terms = [output]
        before = self.derivatives.get(key)
        if before is not None and self.order > 0:
            step = self.time - self.computed_at[key]
            for i in range(min(self.order, len(before))):
                terms.append((terms[i] - before[i]) / step)
        self.derivatives[key], self.computed_at[key] = terms, self.time
        return output

    def cached(self, branch: Branch) -> torch.Tensor:
        key = branch.unit
        terms = self.derivatives[key]
        distance = self.time - self.computed_at[key]
        forecast = terms[0]
        for i in range(1, len(terms)):
            forecast = forecast + terms[i] * (distance**i / math.factorial(i))
        return forecast
