"""The text-encoder slot: a registry of named kinds, filled by the core and by method families.

``@register_text_encoder("name")`` turns a factory ``(**options) -> TextEncoder`` into a kind a config can
name (``text_encoder: scene-clip``, ``text_encoder_options: {...}``). The core registers ``clip-l`` and ``t5``
(local folders only); ditlab's scene CLIP registers ``scene-clip`` from its own package. An unknown name loads
the installed families once (``ditlab.plugins``) before it is refused, as the block-component slots do.

A kind whose weights can change while its options stay the same (the scene CLIP: a new default recipe) registers
``pin``, which turns options into ones that name exactly today's weights; every file that records a network's
config records the pinned options (:func:`pinned_text_options`), so a checkpoint keeps reading captions the way it
was trained to. ``unpinned`` is what a file written before the kind was pinned meant (:func:`options_before_pins`).
"""

from __future__ import annotations

from collections.abc import Callable

from ditlab.models.text.features import TextEncoder

Factory = Callable[..., TextEncoder]
Pin = Callable[[dict], dict]
TEXT_ENCODERS: dict[str, Factory] = {}
PINS: dict[str, tuple[Pin, dict]] = {}


def register_text_encoder(name: str, pin: Pin | None = None, unpinned: dict | None = None) -> Callable[[Factory], Factory]:
    """Decorator: ``factory(**options) -> TextEncoder`` becomes the text-encoder kind ``name``; ``pin(options)``
    returns options naming exactly the weights ``options`` give today, ``unpinned`` the options a file written
    before the kind had a pin meant."""

    def add(factory: Factory) -> Factory:
        known = TEXT_ENCODERS.get(name)
        if known is not None and known.__qualname__ != factory.__qualname__:
            raise ValueError(f"text encoder kind {name!r} is already registered (by {known.__module__}); pick another name")
        TEXT_ENCODERS[name] = factory
        if pin is not None:
            PINS[name] = (pin, dict(unpinned or {}))
        return factory

    return add


def _known(name: str) -> bool:
    if name not in TEXT_ENCODERS:
        from ditlab.plugins import load_plugins

        load_plugins()
    return name in TEXT_ENCODERS


def build_text_encoder(name: str, **options) -> TextEncoder:
    """The text encoder ``name`` built with ``options`` (frozen, eval mode)."""
    if not _known(name):
        raise ValueError(f"unknown text encoder kind {name!r}; registered: {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[name](**options).requires_grad_(False).eval()


def pinned_text_options(name: str, options: dict) -> dict:
    """``options`` of the kind ``name`` pinned to the weights they give today (unchanged for a kind with no pin,
    or one this installation does not know)."""
    return PINS[name][0](dict(options)) if _known(name) and name in PINS else dict(options)


def options_before_pins(name: str, options: dict) -> dict:
    """``options`` as recorded by a file written before the kind ``name`` was pinned, pinned to what they meant
    then (already pinned options come back unchanged: pinning is idempotent)."""
    if not (_known(name) and name in PINS):
        return dict(options)
    pin, unpinned = PINS[name]
    return pin({**unpinned, **options}) if pin(dict(options)) != dict(options) else dict(options)
