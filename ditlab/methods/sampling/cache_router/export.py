"""A trained router checkpoint as a static plan that ``--cache plan:PLAN.json`` runs (``ditlab export``), and the
model-function factory that samples a teacher through a plan (``ditlab sample --ckpt ROUTER.ckpt``).

    ditlab export --ckpt ROUTER.ckpt --out plan.json [--threshold 0.1]
        [--sampler ddim --steps 20]   # refused in one line if the router was trained for another schedule

The plan records the call times it was trained on (any time grid or SDE end), so ``--cache plan:PLAN.json`` refuses
a sampling whose calls fall elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditlab.diffusion.cache import as_cache_config
from ditlab.methods.sampling.caches.plan import Plan, StaticPlan
from ditlab.methods.sampling.schedule import check_schedule, schedule_times
from ditlab.models.loading import read_checkpoint


def plan_from_checkpoint(path: str | Path | dict, threshold: float | None = None, sampler: str | None = None,
                         steps: int | None = None) -> StaticPlan:  # fmt: skip
    """The plan of the router saved at ``path`` (or in a read checkpoint); ``sampler``/``steps``, when given, must be
    the router's own."""
    checkpoint = path if isinstance(path, dict) else read_checkpoint(path)
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
    source = "" if isinstance(path, dict) else str(path)
    return StaticPlan(computes.tolist(), saved["times"], saved["sampler"], saved["steps"], saved["depth"], threshold,
                      source=source, meta={"mode": saved["mode"], "teacher": saved["teacher"]})  # fmt: skip


def plan_factory(plan: StaticPlan):
    """``factory(network, objective, **sampling options) -> Plan``: the network through ``plan``; another schedule
    (sampler, steps, call times) or a feature cache on top is refused in one line."""

    def through_plan(network, objective, cache=None, **options) -> Plan:
        policy = as_cache_config(cache).policy
        if policy != "none":
            raise ValueError(f"a router run samples through its own plan; --cache {policy} does not apply (sample "
                             "its teacher's checkpoint to try another cache)")  # fmt: skip
        model = Plan(network, schedule_times(objective, **options), plan=plan)
        model.check_sampling(options.get("sampler") or objective.default_sampler, options.get("steps"))
        return model

    return through_plan
