"""``--cache POLICY --cache.KNOB VALUE``: the command-line form of ``sampling.cache`` for the ditlab tools."""

from __future__ import annotations

import argparse
from dataclasses import fields

KNOB_HELP = {
    "interval": "fora/delta-dit/taylorseer/toca: compute everything every N model calls",
    "threshold": "teacache/magcache: accumulated change (error) budget before a computed call",
    "blocks": "delta-dit: width of the cached block range",
    "boundary": "delta-dit: share of calls that cache the rear range before the front range",
    "order": "taylorseer: order of the forecast",
    "max_skip": "magcache: most consecutive reused calls",
    "warmup": "model calls at the start that always compute",
    "ratio": "toca: share of tokens whose MLP is recomputed on a cached call",
    "coefficients": "teacache: comma-separated rescaling polynomial, highest power first (default: fitted)",
    "magnitudes": "magcache: comma-separated magnitude ratio per model call (default: calibrated)",
}


def float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--cache`` and one ``--cache.<knob>`` option per ``CacheConfig`` field."""
    from ditlab.diffusion.config import CacheConfig

    group = parser.add_argument_group("feature cache (ditlab.methods.accel)")
    group.add_argument("--cache", default=None, metavar="POLICY",
                       help="none | fora | delta-dit | teacache | taylorseer | magcache | toca (default: the run's)")  # fmt: skip
    for item in fields(CacheConfig):
        if item.name == "policy":
            continue
        kind = float_list if item.name in ("coefficients", "magnitudes") else int if "int" in str(item.type) else float
        group.add_argument(f"--cache.{item.name}", dest=f"cache_{item.name}", type=kind, default=None,
                           help=KNOB_HELP.get(item.name))  # fmt: skip


def cache_from_args(args: argparse.Namespace, recorded=None):
    """The ``CacheConfig`` the options ask for: ``--cache`` and its knobs over ``recorded`` (the run's own).

    Knobs without ``--cache`` refine the recorded policy; ``--cache`` alone starts from that policy's defaults.
    """
    from ditlab.diffusion.config import CacheConfig

    knobs = {item.name: getattr(args, f"cache_{item.name}") for item in fields(CacheConfig) if item.name != "policy"}
    given = {name: value for name, value in knobs.items() if value is not None}
    if args.cache is None and not given:
        return recorded if recorded is not None else CacheConfig()
    if args.cache is None:
        base = recorded if recorded is not None else CacheConfig()
        if base.policy == "none":
            raise ValueError(f"--cache.{next(iter(given))} needs a policy: add --cache POLICY")
        return CacheConfig(**{**{f.name: getattr(base, f.name) for f in fields(CacheConfig)}, **given})
    return CacheConfig(policy=args.cache, **given)
