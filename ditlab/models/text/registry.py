"""The text-encoder slot: a registry of named kinds, filled by the core and by method families.

``@register_text_encoder("name")`` turns a factory ``(**options) -> TextEncoder`` into a kind a config can
name (``text_encoder: scene-clip``, ``text_encoder_options: {...}``). The core registers ``clip-l`` and ``t5``
(local folders only); ditlab's scene CLIP registers ``scene-clip`` from its own package. An unknown name loads
the installed families once (``ditlab.plugins``) before it is refused, as the block-component slots do.
"""

from __future__ import annotations

from collections.abc import Callable

from ditlab.models.text.features import TextEncoder

Factory = Callable[..., TextEncoder]
TEXT_ENCODERS: dict[str, Factory] = {}


def register_text_encoder(name: str) -> Callable[[Factory], Factory]:
    """Decorator: ``factory(**options) -> TextEncoder`` becomes the text-encoder kind ``name``."""

    def add(factory: Factory) -> Factory:
        known = TEXT_ENCODERS.get(name)
        if known is not None and known.__qualname__ != factory.__qualname__:
            raise ValueError(f"text encoder kind {name!r} is already registered (by {known.__module__}); pick another name")
        TEXT_ENCODERS[name] = factory
        return factory

    return add


def build_text_encoder(name: str, **options) -> TextEncoder:
    """The text encoder ``name`` built with ``options`` (frozen, eval mode)."""
    if name not in TEXT_ENCODERS:
        from ditlab.plugins import load_plugins

        load_plugins()
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder kind {name!r}; registered: {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[name](**options).requires_grad_(False).eval()
