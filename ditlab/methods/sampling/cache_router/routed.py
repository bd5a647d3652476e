"""Routed model calls and the sampler steps around them, as training and the image-error proxy run them.

A routed call blends each branch's fresh pre-gate output with the one cached from earlier calls,
``s * fresh + (1 - s) * cached`` (gates recomputed from the current condition), so the loss is differentiable in the
router's scores. The cache entry of a unit is refreshed, detached, only where ``s > threshold``, the way the
exported plan refreshes it at inference, so the cache a training rollout carries from step to step is the one
sampling will carry [interp: HarmoniCa's step-wise training keeps stale entries across steps; refreshing them
by the inference rule is our reading]. On the first call there is no cache and every branch is computed.

:class:`SamplingRun` replays what ``ditlab.diffusion.sample.denoise`` does around a model call (the sampler's
stepper, network time, ``[cond; uncond]`` guidance rows) so a rollout here follows the trajectory sampling
follows, one step at a time, with the student's prediction or the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditlab.diffusion.sample import make_stepper
from ditlab.diffusion.steppers import Stepper
from ditlab.methods.sampling.caches.plan import unit_index
from ditlab.models.dit import DiT
from ditlab.models.taps import Branch, run_block_range

Cache = dict[tuple[int, str], torch.Tensor]


def routed_call(dit: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, cache: Cache,
                threshold: float) -> torch.Tensor:  # fmt: skip
    """The network output with every branch blended by ``scores`` (``(units,)`` or one row per sample
    ``(B, units)``) against ``cache``, which is refreshed in place (see the module notes)."""

    def blend(branch: Branch) -> torch.Tensor:
        key = (branch.block, branch.kind)
        fresh = branch.compute()
        cached = cache.get(key)
        if cached is None:
            cache[key] = fresh.detach()
            return fresh
        score = scores[..., unit_index(*key)]
        score = score.reshape(-1, 1, 1) if score.ndim else score
        cache[key] = torch.where(score > threshold, fresh, cached).detach()
        return score * fresh + (1 - score) * cached

    tokens, cond = dit.embed(x, t, y)
    return dit.head(run_block_range(dit, tokens, cond, branches=blend), cond)


@dataclass
class SamplingRun:
    """One sampler schedule with guidance, stepped by hand: what ``denoise`` does around each model call."""

    objective: object
    sampler: str
    steps: int | None
    cfg_scale: float
    cfg_channels: int | None
    null_label: int
    ddim_alpha_to_one: bool | None = None

    def stepper(self) -> Stepper:
        return make_stepper(self.objective, self.sampler, self.steps, ddim_alpha_to_one=self.ddim_alpha_to_one)

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def inputs(self, stepper: Stepper, x: torch.Tensor, index: int, labels: torch.Tensor):
        """``(x, t, y)`` of model call ``index``: ``[cond; uncond]`` rows when guided."""
        x = stepper.model_input(x, index)
        t = self.objective.model_time(stepper.times[index]).to(x.device).expand(len(x))
        if not self.guided:
            return x, t, labels
        return torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, self.null_label)])

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample ``values`` repeated for the guidance rows."""
        return torch.cat([values, values]) if self.guided else values

    def advance(self, stepper: Stepper, output: torch.Tensor, index: int, x: torch.Tensor) -> torch.Tensor:
        """The sample after call ``index`` given its raw (unguided, all channels) network ``output``."""
        channels = x.shape[1]
        if self.guided:
            mixed = self.cfg_channels or channels
            cond, uncond = output[:, :mixed].chunk(2)
            output = torch.cat([uncond + self.cfg_scale * (cond - uncond), output[:, mixed:].chunk(2)[0]], dim=1)
        output = output if stepper.uses_variance else output[:, :channels]
        return stepper.step(output, index, x)
