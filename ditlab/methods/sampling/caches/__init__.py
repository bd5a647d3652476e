"""Training-free sampling acceleration: feature-caching policies over the DiT block loop, the redundancy probe
that says which units can be cached when, and FLOP counting for the speed-quality benchmark.

Select a policy with ``sampling.cache: {policy: NAME, options: {...}}`` (``ditlab.diffusion.cache.CacheConfig``)
in a config, ``--cache NAME --cache.KNOB V`` on ``ditlab sample`` / ``ditlab eval``, or :func:`build_policy` in
code. Importing this package registers every policy here with the core (``ditlab.diffusion.cache``).
"""

from ditlab.diffusion.sample import model_call_times
from ditlab.methods.sampling.caches import delta_dit, fora, magcache, none, plan, taylorseer, teacache, toca  # noqa: F401 - register
from ditlab.methods.sampling.caches.build import build_policy, planned_policy
from ditlab.methods.sampling.caches.policy import CachePolicy, register_policy

__all__ = ["CachePolicy", "build_policy", "model_call_times", "planned_policy", "register_policy"]
