"""Public text-to-image transformers of diffusers in and out of the ditlab core, one module per model class.

Each module converts one diffusers class exactly (``PixArtTransformer2DModel``, ``SD3Transformer2DModel``,
``FluxTransformer2DModel``) and offers the same four functions: ``config_from_diffusers(config: dict) -> DiTConfig``,
``state_from_diffusers(state: dict, config: DiTConfig) -> dict``, ``diffusers_config(config: DiTConfig) -> dict`` and
``state_to_diffusers(state: dict, config: DiTConfig) -> dict``. :func:`converter` picks the module by class name.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

from ditlab.models.loading import load_matching

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


CLASS_OF_BLOCK = {"pixart": "PixArtTransformer2DModel", "mmdit": "SD3Transformer2DModel",
                  "flux": "FluxTransformer2DModel", "flux-single": "FluxTransformer2DModel"}  # fmt: skip


def folder_class(folder: Path) -> str | None:
    """The diffusers class a model folder (or a pipeline folder's ``transformer/``) holds, from its config.json."""
    for candidate in (folder / "transformer" / "config.json", folder / "config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text()).get("_class_name")
    return None


def load_folder(folder: str | Path):
    """The ditlab network of a diffusers PixArt / SD3 / FLUX transformer folder (or pipeline folder), exactly."""
    folder = Path(folder).expanduser()
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    config = json.loads((folder / "config.json").read_text())
    module = converter(config.get("_class_name", ""))
    model_class = getattr(importlib.import_module("diffusers"), config["_class_name"])
    model = model_class.from_pretrained(folder, local_files_only=True)
    return from_model(model, module)


def from_model(model, module: ModuleType | None = None):
    """The ditlab network computing what the diffusers ``model`` (PixArt / SD3 / FLUX transformer) computes."""
    module = module or converter(type(model).__name__)
    config = module.config_from_diffusers(dict(model.config))
    network = config.build()
    weights = module.state_from_diffusers({k: v.detach().clone() for k, v in model.state_dict().items()}, config)
    load_matching(network, weights, type(model).__name__)
    return network.eval()


def to_model(network):
    """The diffusers transformer computing what a text-conditioned ditlab ``network`` computes (its block kind picks
    the class: pixart -> PixArt, mmdit -> SD3, flux -> FLUX); one line for a network no class can express."""
    config = network.config
    name = CLASS_OF_BLOCK.get(config.block)
    if name is None:
        raise ValueError(f"a {config.block!r}-block network has no diffusers text-to-image class; ditlab exports "
                         f"{sorted(CLASS_OF_BLOCK)} blocks (and class-conditional DiTs)")  # fmt: skip
    module = converter(name)
    model_class = getattr(importlib.import_module("diffusers"), name)
    model = model_class.from_config(module.diffusers_config(config))
    state = module.state_to_diffusers({k: v.detach().clone() for k, v in network.state_dict().items()}, config)
    load_matching(model, state, f"converted {config.block} network")
    return model.eval()
