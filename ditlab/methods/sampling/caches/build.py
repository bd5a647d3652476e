"""From a ``CacheConfig`` to the model function the sampler calls: plan, check, calibrate."""

from __future__ import annotations

from typing import Any

from ditlab.diffusion.sample import model_call_times
from ditlab.methods.sampling.caches.calibration import calibrate
from ditlab.methods.sampling.caches.policy import CachePolicy, policy_class, policy_settings
from ditlab.models.dit import DiT


def as_cache_config(cache: Any):
    """A ``CacheConfig`` from itself, its ``asdict`` form, a policy name or None (no cache)."""
    from ditlab.diffusion.config import CacheConfig

    if cache is None:
        return CacheConfig()
    if isinstance(cache, CacheConfig):
        return cache
    if isinstance(cache, str):
        return CacheConfig(policy=cache)
    if isinstance(cache, dict):
        return CacheConfig(**cache)
    raise TypeError(f"a cache is a CacheConfig, a dict of its fields or a policy name, not {type(cache).__name__}")


SCHEDULE_OPTIONS = ("time_grid", "ddim_alpha_to_one", "sde")
"""Sampling options that change which model calls a trajectory makes (the rest change only their inputs)."""


def build_policy(dit: DiT, cache: Any, objective, sampler: str | None = None, steps: int | None = None,
                 cfg_scale: float = 1.0, cfg_channels: int | None = None, **sampling: Any) -> CachePolicy:  # fmt: skip
    """The policy ``cache`` names, planned for the sampler's model calls on ``dit``, calibrated if it must be.

    ``sampling`` takes the other ``SamplingConfig`` options (``time_grid``, ``guidance_interval``, ...; a
    ``batch_size`` is ignored). Calibration (TeaCache's polynomial, MagCache's magnitudes) samples a few seeded
    images uncached with the same options, so a cache is always fitted to the schedule it serves.
    """
    cache = as_cache_config(cache)
    sampler = sampler or objective.default_sampler
    sampling = {key: value for key, value in sampling.items() if key not in ("batch_size", "cache")}
    schedule = model_call_times(objective, sampler, steps, **{k: v for k, v in sampling.items() if k in SCHEDULE_OPTIONS})
    if schedule is None:
        raise ValueError(f"the {cache.policy} cache plans every model call ahead, but {sampler} is an adaptive solver "
                         "whose calls depend on its error control; use a fixed-step sampler (euler, heun, sde)")  # fmt: skip
    policy = policy_class(cache.policy)(dit, schedule, **policy_settings(cache))
    if hasattr(policy, "check_sampling"):  # a plan learned for one sampler refuses another on the same call times
        policy.check_sampling(sampler, steps)
    if getattr(policy, "needs_calibration", False):
        policy.calibrate(calibrate(dit, objective, schedule, policy.calibration_samples, sampler=sampler, steps=steps,
                                   cfg_scale=cfg_scale, cfg_channels=cfg_channels, **sampling))  # fmt: skip
    return policy


def cached_model(network: DiT, cache: Any, objective, sampler: str | None = None, steps: int | None = None,
                 cfg_scale: float = 1.0, cfg_channels: int | None = None, **sampling: Any):  # fmt: skip
    """What to sample: ``network`` itself when there is no cache, else its policy (see :func:`build_policy`)."""
    cache = as_cache_config(cache)
    if cache.policy == "none":
        return network
    return build_policy(network, cache, objective, sampler, steps, cfg_scale, cfg_channels, **sampling)
