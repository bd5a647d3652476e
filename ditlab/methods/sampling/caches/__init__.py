"""Training-free sampling acceleration: feature-caching policies over the DiT block loop, the redundancy probe
that says which units can be cached when, and FLOP counting for the speed-quality benchmark.

Select a policy with ``sampling.cache`` (``CacheConfig``) in a config, ``--cache NAME --cache.KNOB V`` on
``ditlab sample`` / ``ditlab eval``, or :func:`cached_model` in code.
"""

from ditlab.diffusion.sample import model_call_times
from ditlab.methods.sampling.caches import delta_dit, fora, magcache, none, plan, taylorseer, teacache, toca  # noqa: F401 - register
from ditlab.methods.sampling.caches.build import as_cache_config, build_policy, cached_model
from ditlab.methods.sampling.caches.policy import (
    POLICIES,
    CachePolicy,
    check_cache_config,
    policy_class,
    policy_settings,
    register_policy,
)

__all__ = ["POLICIES", "CachePolicy", "as_cache_config", "build_policy", "cached_model", "check_cache_config",
           "model_call_times", "policy_class", "policy_settings", "register_policy"]
