"""Feature caches as a sampling option: ``sampling.cache`` is ``{policy, options}``, as a network's ``attention``
is a name plus ``attention_options``.

The core knows each policy only by what it registers (:func:`register_cache_policy`): its name, its options
dataclass (the knobs, their defaults and ranges, declared with :func:`knob`) and a factory that turns a network
into the model function the sampler calls. So a config is checked when it is made, and sampled, without the core
importing any family: a name it does not know loads the installed families once (``ditlab.plugins``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

CacheFactory = Callable[..., Any]
"""``factory(network, objective, options, **sampling_options) -> model function`` (``sampling_options``: sampler,
steps, cfg_scale, cfg_channels and the other ``SamplingConfig`` fields but ``cache``)."""


@dataclass(frozen=True)
class CachePolicyEntry:
    """What a policy registered: its options dataclass and its model-function factory (None: the network)."""

    options: type
    factory: CacheFactory | None


CACHE_POLICIES: dict[str, CachePolicyEntry] = {}


def knob(default: Any, low: float | None = None, high: float | None = None) -> Any:
    """An options field with a closed range (None: unbounded), checked when a ``CacheConfig`` is made."""
    return field(default=default, metadata={"range": (low, high)})


def register_cache_policy(name: str, options: type, factory: CacheFactory | None) -> None:
    """Make a policy selectable as ``sampling.cache.policy`` / ``--cache NAME``; a later registration replaces it."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"cache policy {name!r}: its options must be a dataclass, not {options!r}")
    CACHE_POLICIES[name] = CachePolicyEntry(options, factory)


@dataclass
class NoOptions:
    """``none`` has no knobs."""


register_cache_policy("none", NoOptions, None)


def cache_policy(name: str) -> CachePolicyEntry:
    """The registered policy ``name``; an unknown name loads the installed families once before it is refused."""
    if name not in CACHE_POLICIES:
        from ditlab.plugins import load_plugins

        load_plugins()
    if name not in CACHE_POLICIES:
        raise ValueError(f"unknown cache policy {name!r} (cache.policy / --cache); registered: {sorted(CACHE_POLICIES)}")
    return CACHE_POLICIES[name]


def cache_policies() -> dict[str, CachePolicyEntry]:
    """Every policy, the installed families' included (what ``--cache.*`` offers)."""
    from ditlab.plugins import load_plugins

    load_plugins()
    return dict(CACHE_POLICIES)


def knob_types(options: type) -> dict[str, Any]:
    """``{knob: type hint}`` of an options dataclass."""
    hints = typing.get_type_hints(options)
    return {item.name: hints[item.name] for item in dataclasses.fields(options)}


def optional_of(hint: Any) -> Any:
    """``int`` of ``int | None`` (and of ``int``), ``list[float]`` of ``list[float] | None``."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def scalar_kind(hint: Any) -> Any:
    """``int`` of ``int | None``, ``list`` of ``list[float] | None``, else the hint."""
    hint = optional_of(hint)
    return typing.get_origin(hint) or hint


def checked(policy: str, name: str, value: Any, hint: Any, bounds: tuple) -> Any:
    """``value`` converted to the knob's type ``hint`` and range-checked, or a one-line ``ValueError``."""
    where = f"cache.options.{name}={value!r}"
    kind, items = scalar_kind(hint), typing.get_args(optional_of(hint))
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{where} must be a number for the {policy} policy")
        if kind is int and int(value) != value:
            raise ValueError(f"{where} must be a whole number for the {policy} policy")
        low, high = bounds
        if (low is not None and value < low) or (high is not None and value > high):
            need = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
            raise ValueError(f"{where} is out of range for the {policy} policy; it must be {need}")
        return kind(value)
    if kind is list and items and items[0] in (int, float):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
            raise ValueError(f"{where} must be a list of numbers for the {policy} policy")
        return [items[0](v) for v in value]
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string for the {policy} policy")
    return value


def cache_options(policy: str, options: Mapping[str, Any]) -> Any:
    """The options dataclass of ``policy`` from the knobs given (the rest at their defaults), every value checked.

    A knob the policy does not read is refused rather than ignored: a sweep that sets ``threshold`` on ``fora``
    would otherwise silently measure the default.
    """
    cls = cache_policy(policy).options
    hints = knob_types(cls)
    stray = [name for name in options if name not in hints]
    if stray:
        raise ValueError(f"cache.options.{stray[0]} is not a knob of the {policy} policy "
                         f"(its knobs: {', '.join(hints) or 'none'})")  # fmt: skip
    bounds = {item.name: item.metadata.get("range", (None, None)) for item in dataclasses.fields(cls)}
    values = {name: checked(policy, name, value, hints[name], bounds[name])
              for name, value in options.items() if value is not None}  # fmt: skip
    return cls(**values)


@dataclass
class CacheConfig:
    """A training-free feature cache for sampling: a registered policy and its knobs.

    A knob left out (or None) takes the policy's default; a knob the policy does not read is an error. Each
    policy documents its knobs in its options dataclass (``ditlab.methods.sampling.caches``: fora, delta-dit,
    teacache, taylorseer, magcache, toca, plan); ``ditlab sample --help`` lists them.

    Args:
        policy: none (default) or a registered policy name.
        options: the policy's knobs, e.g. ``{interval: 3}``.
    """

    policy: str = "none"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = self.options if isinstance(self.options, Mapping) else vars(self.options)
        checked_options = cache_options(self.policy, given)
        self.options = {name: getattr(checked_options, name) for name, value in given.items() if value is not None}

    def __setstate__(self, state: dict) -> None:
        """A pickle of the old flat ``CacheConfig`` (every knob a field) becomes ``{policy, options}``."""
        converted = as_cache_config(state)
        self.policy, self.options = converted.policy, converted.options

    def settings(self) -> Any:
        """The policy's options dataclass, defaults filled in."""
        return cache_options(self.policy, self.options)


def as_cache_config(cache: Any) -> CacheConfig:
    """A ``CacheConfig`` from itself, a policy name, None (no cache) or a dict: ``{policy, options}`` or the flat
    form written before policies owned their knobs (``{policy: fora, interval: 3, threshold: null, ...}``). The flat
    form also takes the policy's ``Options.legacy`` knobs, which pin the plan it sampled with before a policy
    moved to its paper's schedule (fora: ``align: start``), so old checkpoints sample bitwise as before."""
    if cache is None:
        return CacheConfig()
    if isinstance(cache, CacheConfig):
        return cache
    if isinstance(cache, str):
        return CacheConfig(policy=cache)
    if isinstance(cache, Mapping):
        policy = cache.get("policy") or "none"
        flat = {key: value for key, value in cache.items() if key not in ("policy", "options") and value is not None}
        if len(cache.keys() - {"policy", "options"}):  # the old flat form: pin the plan it sampled with
            flat = {**getattr(cache_policy(policy).options, "legacy", {}), **flat}
        return CacheConfig(policy, {**(cache.get("options") or {}), **flat})
    raise TypeError(f"a cache is a CacheConfig, a dict of its fields or a policy name, not {type(cache).__name__}")


def cache_model_function(network: Any, objective: Any, cache: Any, **sampling_options: Any) -> Any:
    """What the sampler calls: ``network`` itself without a cache, else the factory of the registered policy
    (planned for the sampler's model calls, calibrated if it must be). ``cache``: see :func:`as_cache_config`."""
    cache = as_cache_config(cache)
    entry = cache_policy(cache.policy)
    if cache.policy == "none" or entry.factory is None:
        return network
    return entry.factory(network, objective, cache.settings(), **sampling_options)
