"""HarmoniCa's image-error proxy: how much routing step ``k`` (on top of the steps before it) moves the final sample.

IEPO (Huang et al., ICML 2025, ModelTC/HarmoniCa) weights step ``k``'s training loss by
``lambda_k = mean((x0^(<=k) - x0^(<k))^2)``, where ``x0^(<=k)`` is the final latent of a trajectory that uses the
router's current soft scores on steps ``0..k`` and computes everything afterwards. The definition needs one
trajectory per prefix; :func:`image_error_proxy` runs all of them as one batch (prefix ``g`` in row group ``g``),
:func:`image_error_proxy_reference` one after another (the tests check they agree). The proxy is taken on the
network's sample space (latents for a latent DiT), as HarmoniCa's code does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ditlab.diffusion.trajectory import Trajectory
from ditlab.methods.sampling.cache_router.routed import routed_call
from ditlab.methods.sampling.conditions import repeat_conditions
from ditlab.models.dit import DiT

Start = Callable[[torch.Tensor, torch.Tensor], Trajectory]
"""``start(noise, labels)``: a trajectory of the schedule and guidance the router is trained for (``labels``: class
labels or encoded ``TextFeatures``)."""


def prefix_scores(scores: torch.Tensor, prefix: int) -> torch.Tensor:
    """``scores`` on the first ``prefix`` rows (steps), exactly 1 (compute everything) on the rest."""
    keep = torch.arange(len(scores), device=scores.device)[:, None] < prefix
    return torch.where(keep, scores, torch.ones_like(scores))


@torch.no_grad()
def final_samples(dit: DiT, start: Start, noise: torch.Tensor, labels: torch.Tensor, row_scores: torch.Tensor,
                  threshold: float) -> torch.Tensor:  # fmt: skip
    """The trajectory's end from ``noise`` with per-sample scores ``row_scores: [steps, B, units]``."""
    trajectory, cache = start(noise, labels), {}
    while not trajectory.done:
        scores = trajectory.rows(row_scores[trajectory.index])
        trajectory.step(routed_call(dit, *trajectory.inputs(), scores, cache, threshold))
    return trajectory.x


def image_error_proxy(dit: DiT, start: Start, scores: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor,
                      threshold: float) -> torch.Tensor:  # fmt: skip
    """``lambda: [steps]`` (``lambda_0 = 0``: nothing precedes step 0), every prefix batched in one trajectory."""
    steps, batch = len(scores), len(noise)
    groups = [prefix_scores(scores, prefix)[:, None, :].expand(steps, batch, scores.shape[1]) for prefix in range(1, steps + 1)]
    finals = final_samples(dit, start, noise.repeat(steps, *[1] * (noise.ndim - 1)), repeat_conditions(labels, steps),
                           torch.cat(groups, dim=1), threshold).view(steps, *noise.shape)  # fmt: skip
    change = (finals[1:] - finals[:-1]).square().flatten(1).mean(1)
    return torch.cat([change.new_zeros(1), change])


def image_error_proxy_reference(dit: DiT, start: Start, scores: torch.Tensor, noise: torch.Tensor,
                                labels: torch.Tensor, threshold: float) -> torch.Tensor:  # fmt: skip
    """The definition, one trajectory per prefix (slow; the reference the batched proxy is tested against)."""
    steps, batch = len(scores), len(noise)
    finals = [final_samples(dit, start, noise, labels, prefix_scores(scores, prefix)[:, None, :].expand(steps, batch, -1),
                            threshold) for prefix in range(1, steps + 1)]  # fmt: skip
    return torch.stack([torch.zeros((), dtype=noise.dtype)] +
                       [(finals[k] - finals[k - 1]).square().mean() for k in range(1, steps)])  # fmt: skip


def loss_weights(proxy: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """Per-step loss weights from the proxy: mean 1 over the ``trained`` steps, so ``lr`` and the sparsity weight keep
    their meaning when the proxy's scale changes [interp: HarmoniCa's exact normalisation is not reproduced]; all
    ones while the proxy is zero (a router that computes everything changes nothing yet)."""
    weights = torch.ones_like(proxy)
    mean = proxy[trained].mean()
    if mean > 0:
        weights[trained] = proxy[trained] / mean
    weights[~trained] = 0.0
    return weights
