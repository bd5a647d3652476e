"""Public text-to-image transformers of diffusers in and out of the ditlab core, one module per model class.

Each module converts one diffusers class exactly (``PixArtTransformer2DModel``, ``SD3Transformer2DModel``,
``FluxTransformer2DModel``) and offers the same four functions: ``config_from_diffusers(config: dict) -> DiTConfig``,
``state_from_diffusers(state: dict, config: DiTConfig) -> dict``, ``diffusers_config(config: DiTConfig) -> dict`` and
``state_to_diffusers(state: dict, config: DiTConfig) -> dict``. :func:`converter` picks the module by class name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

CONVERTERS = {
    "PixArtTransformer2DModel": "ditlab.models.diffusers_t2i.pixart",
    "SD3Transformer2DModel": "ditlab.models.diffusers_t2i.sd3",
    "FluxTransformer2DModel": "ditlab.models.diffusers_t2i.flux",
}


def converter(class_name: str) -> ModuleType:
    """The conversion module of the diffusers class ``class_name``; one line naming the known ones otherwise."""
    if class_name not in CONVERTERS:
        raise ValueError(f"ditlab does not convert diffusers {class_name!r}; it converts {sorted(CONVERTERS)} "
                         "and DiTTransformer2DModel")  # fmt: skip
    return importlib.import_module(CONVERTERS[class_name])
