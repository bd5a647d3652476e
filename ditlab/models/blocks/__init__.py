"""Text-conditioned block kinds of the core (PixArt, SD3 MM-DiT, FLUX), registered with ``register_block`` on import
(``build_component`` imports this package when a config names a block kind it has not seen)."""

import importlib

for _kind in ("pixart", "mmdit", "flux"):
    try:
        importlib.import_module(f"ditlab.models.blocks.{_kind}")
    except ModuleNotFoundError as error:  # a kind still being written is simply not offered
        if error.name != f"ditlab.models.blocks.{_kind}":
            raise
