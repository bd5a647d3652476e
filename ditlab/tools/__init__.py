"""Command-line tools that work from a checkpoint or a dataset: ``ditlab sample``, ``eval``, ``analyze``, ``convert``,
``encode``, ``export``; each is a typed function run by :mod:`ditlab.tools.command`.

The table of tools lives here, free of heavy imports, so ``ditlab --help`` lists them without importing a tool (or
torch); a tool's module is imported when it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tool:
    """A ``ditlab`` command that runs ``target`` (``module:function``)."""

    target: str
    summary: str  # the one line ``ditlab --help`` shows
    positional: str | None = None  # parameter that may be given as the first, unnamed argument
    aliases: dict[str, str] = field(default_factory=dict)  # extra option name -> parameter

    def function(self) -> Callable[..., int]:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


TOOLS = {
    "sample": Tool("ditlab.tools.sample:sample", "draw images (PNGs + samples.npz) from a checkpoint",
                   aliases={"class": "label"}),  # fmt: skip
    "eval": Tool("ditlab.tools.eval:evaluate", "FID / IS / precision / recall of a checkpoint or a samples.npz"),
    "analyze": Tool("ditlab.tools.analyze:analyze",
                    "per-block importance of a trained network (blocks to keep when pruning), or --redundancy"),
    "convert": Tool("ditlab.tools.convert:convert", "export a run's network as safetensors or a diffusers folder"),
    "encode": Tool("ditlab.tools.encode:encode", "pre-extract VAE latents of an image folder into shards for "
                   "latent training", positional="source"),
    "export": Tool("ditlab.tools.export:export", "a cache-router run as a cache plan, a dynamic-compute run in its "
                   "inference form"),
}  # fmt: skip
