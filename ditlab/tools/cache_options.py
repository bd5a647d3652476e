"""``--cache POLICY --cache.KNOB V``: the command line's flat spelling of ``sampling.cache: {policy, options}``.

The options are read from the registry (every registered policy's options dataclass), so a policy a family or a
third-party package registers gets its knobs on the command line, in ``--help`` and in shell completion without
an edit here. A knob several policies share (``interval``) is one option; the policy checks what it reads.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import field, make_dataclass
from typing import Any

from ditlab.diffusion.cache import CacheConfig, cache_policies, knob_types, scalar_kind


def knob_help(options: type) -> dict[str, str]:
    """``{knob: its line}`` from an options dataclass's ``Args:`` section."""
    doc = inspect.cleandoc(options.__doc__ or "")
    lines, found, current = doc.split("Args:", 1)[-1].splitlines() if "Args:" in doc else [], {}, None
    for line in lines:
        name, colon, text = line.strip().partition(":")
        if colon and name.isidentifier() and line.startswith(" " * 4) and not line.startswith(" " * 5):
            current, found[name] = name, text.strip()
        elif current and line.strip():
            found[current] += " " + line.strip()
    return found


def registered_knobs() -> dict[str, tuple[Any, str]]:
    """``{knob: (type hint, help)}`` over every registered policy; the help says which policies read it."""
    hints: dict[str, list] = {}
    readers: dict[str, dict[str, list[str]]] = {}  # knob -> its description -> the policies that say so
    for policy, entry in sorted(cache_policies().items()):
        defaults = vars(entry.options())
        described = knob_help(entry.options)
        for name, hint in knob_types(entry.options).items():
            if hint not in hints.setdefault(name, []):
                hints[name].append(hint)
            text = described.get(name, "").rstrip(".")
            readers.setdefault(name, {}).setdefault(text, []).append(f"{policy} (default {defaults[name]})")
    return {name: (typing.Union[(*hints[name], None)],
                   "; ".join(f"{', '.join(who)}: {text}" for text, who in readers[name].items()) + ".")
            for name in hints}  # fmt: skip


def cache_arguments() -> type:
    """A dataclass of ``policy``, every registered knob (None: the policy's default) and ``options`` (a dict, the
    config's spelling), for ``parser.add_class_arguments(..., "cache")``."""
    knobs = registered_knobs()
    doc = ["The feature cache: a policy and its knobs (each left out takes the policy's default).", "", "Args:",
           "    policy: none (no cache) or one of " + ", ".join(sorted(set(cache_policies()) - {"none"})) + ".",
           *(f"    {name}: {text}" for name, (_, text) in knobs.items()),
           "    options: the knobs as a dict, as a config writes them (``{interval: 3}``)."]  # fmt: skip
    columns = [("policy", str, field(default="none")),
               *((name, hint, field(default=None)) for name, (hint, _) in knobs.items()),
               ("options", dict[str, Any] | None, field(default=None))]  # fmt: skip
    cls = make_dataclass("CacheOptions", columns)
    cls.__doc__ = "\n".join(doc)
    return cls


def list_knobs() -> set[str]:
    """``cache.KNOB`` of every registered list-valued knob (also given as ``1,-2,0.5``)."""
    return {f"cache.{name}" for policy, entry in cache_policies().items()
            for name, hint in knob_types(entry.options).items() if scalar_kind(hint) is list}  # fmt: skip


def flat_cache(cache: CacheConfig) -> dict[str, Any]:
    """Parser defaults (``{"cache.policy": "fora", "cache.interval": 2}``) of a recorded ``CacheConfig``."""
    return {"cache.policy": cache.policy, **{f"cache.{name}": value for name, value in cache.options.items()}}


def given_knobs(parsed: Any) -> dict[str, Any]:
    """The knobs set on the command line or in a file (flat options over ``options``)."""
    values = dict(vars(parsed))
    values.pop("policy", None)
    options = dict(values.pop("options", None) or {})
    return {**options, **{name: value for name, value in values.items() if value is not None}}


def cache_config(parsed: Any) -> CacheConfig:
    """The ``CacheConfig`` of the parsed ``cache`` group; a knob given without a policy is refused (a run without
    a cache has nothing for ``--cache.interval`` to refine) before ``none`` would call it foreign."""
    knobs = given_knobs(parsed)
    if parsed.policy == "none" and knobs:
        raise ValueError(f"--cache.{next(iter(knobs))} needs a policy: add --cache POLICY")
    return CacheConfig(parsed.policy, knobs)
