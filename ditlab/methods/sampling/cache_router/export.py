"""A trained router checkpoint as a static plan that ``--cache plan:PLAN.json`` runs (``ditlab export``).

    ditlab export --ckpt ROUTER.ckpt --out plan.json [--threshold 0.1]
        [--sampler ddim --steps 20]   # refused in one line if the router was trained for another schedule

The plan records the call times it was trained on (any time grid or SDE end), so ``--cache plan:PLAN.json`` refuses
a sampling whose calls fall elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditlab.methods.sampling.caches.plan import StaticPlan
from ditlab.methods.sampling.schedule import check_schedule
from ditlab.models.loading import read_checkpoint


def plan_from_checkpoint(path: str | Path, threshold: float | None = None, sampler: str | None = None,
                         steps: int | None = None) -> StaticPlan:  # fmt: skip
    """The plan of the router saved at ``path``; ``sampler``/``steps``, when given, must be the router's own."""
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("cache_router")
    if saved is None:
        raise ValueError(f"{path} holds no cache router; pass a checkpoint of a CacheRouterModule run")
    if sampler is not None or steps is not None:
        check_schedule(saved, sampler or saved["sampler"], steps if steps is not None else saved["steps"])
    theta = checkpoint["state_dict"]["router.theta"]
    frozen = torch.zeros(len(theta), dtype=torch.bool)
    frozen[list(range(0, len(theta), 2)) if saved["mode"] == "l2c" else [0]] = True
    threshold = saved["threshold"] if threshold is None else threshold
    computes = (torch.sigmoid(theta) > threshold) | frozen[:, None]
    return StaticPlan(computes.tolist(), saved["times"], saved["sampler"], saved["steps"], saved["depth"], threshold,
                      source=str(path), meta={"mode": saved["mode"], "teacher": saved["teacher"]})  # fmt: skip
