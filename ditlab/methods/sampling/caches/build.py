"""From a cache config to the model function the sampler calls: plan, check, calibrate."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ditlab.diffusion.cache import as_cache_config, cache_policy
from ditlab.diffusion.sample import model_call_times
from ditlab.methods.sampling.caches.calibration import calibrate
from ditlab.methods.sampling.caches.policy import CachePolicy
from ditlab.models.dit import DiT

SCHEDULE_OPTIONS = ("time_grid", "ddim_alpha_to_one", "sde")
"""Sampling options that change which model calls a trajectory makes (the rest change only their inputs)."""


def planned_policy(cls: type[CachePolicy], dit: DiT, objective, options: Any, sampler: str | None = None,
                   steps: int | None = None, cfg_scale: float = 1.0, cfg_channels: int | None = None,
                   **sampling: Any) -> CachePolicy:  # fmt: skip
    """Policy ``cls`` with ``options`` (its checked ``Options``), planned for the sampler's model calls on ``dit``,
    calibrated if it must be: the factory every ``register_policy`` class registers.

    ``sampling`` takes the other ``SamplingConfig`` options (``time_grid``, ``guidance_interval``, ...; a
    ``batch_size`` is ignored). Calibration (TeaCache's polynomial, MagCache's magnitudes) samples a few seeded
    images uncached with the same options, so a cache is always fitted to the schedule it serves.
    """
    sampler = sampler or objective.default_sampler
    sampling = {key: value for key, value in sampling.items() if key not in ("batch_size", "cache")}
    schedule = model_call_times(objective, sampler, steps, **{k: v for k, v in sampling.items() if k in SCHEDULE_OPTIONS})
    if schedule is None:
        raise ValueError(f"the {cls.name} cache plans every model call ahead, but {sampler} is an adaptive solver "
                         "whose calls depend on its error control; use a fixed-step sampler (euler, heun, sde)")  # fmt: skip
    policy = cls(dit, schedule, **{item.name: getattr(options, item.name) for item in fields(options)})
    if hasattr(policy, "check_sampling"):  # a plan learned for one sampler refuses another on the same call times
        policy.check_sampling(sampler, steps)
    if getattr(policy, "needs_calibration", False):
        policy.calibrate(calibrate(dit, objective, schedule, policy.calibration_samples, sampler=sampler, steps=steps,
                                   cfg_scale=cfg_scale, cfg_channels=cfg_channels, **sampling))  # fmt: skip
    return policy


def build_policy(dit: DiT, cache: Any, objective, sampler: str | None = None, steps: int | None = None,
                 cfg_scale: float = 1.0, cfg_channels: int | None = None, **sampling: Any):  # fmt: skip
    """The policy ``cache`` names (a ``CacheConfig``, its dict or old flat dict, a name), ``none`` included, built
    by its registered factory (see :func:`planned_policy`)."""
    cache = as_cache_config(cache)
    return cache_policy(cache.policy).factory(dit, objective, cache.settings(), sampler=sampler, steps=steps,
                                              cfg_scale=cfg_scale, cfg_channels=cfg_channels, **sampling)  # fmt: skip

