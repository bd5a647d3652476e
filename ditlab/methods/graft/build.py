"""Building a grafted student from a trained DiT: new operators in chosen blocks, or blocks paired in parallel.

Every weight the new architecture shares with the old one is copied (embedders, norms, MLPs, adaLN, and the
attention's ``qkv`` / ``proj``, which a new operator keeps as its in/out projections); only what the operator
adds (pooled-key weights, Hyena filters) starts fresh, at its identity-like initialisation.

Text-to-image networks: a PixArt block's self-attention is over its image tokens alone, so every operator grafts
into it as into DiT's (its cross-attention to the caption is left as it is, as Grafting leaves the MLPs). An
MM-DiT's (``mmdit``, ``flux``) joint attention runs over ``[text; image]``, which grid operators cannot lay out:
there the one operator grafted is ``clear`` (CLEAR on FLUX: local image attention, text attended globally,
:mod:`ditlab.methods.graft.clear`), and the others are refused in one line.
"""

from __future__ import annotations

from typing import Any

import torch

from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT

TEXT_STREAM_OPERATORS = ("full", "clear")
"""Operators that can be grafted into a joint ``[text; image]`` attention (MM-DiT)."""


def graft_operator(network: DiT, kind: str, options: dict[str, Any] | None = None,
                   blocks: list[int] | None = None) -> DiT:  # fmt: skip
    """A copy of ``network`` whose ``blocks`` (default all) use the attention kind ``kind`` with ``options``."""
    config = network.config
    if config.attention != "full":
        raise ValueError(f"this network already has {config.attention!r} attention; graft onto a full-attention DiT")
    if network.text_stream and kind not in TEXT_STREAM_OPERATORS:
        raise ValueError(f"the {kind!r} operator lays tokens out on the image grid, but this {config.block!r} network's "
                         "joint attention carries [text; image]; graft 'clear' (CLEAR's local attention on the image "
                         "tokens, the text tokens attended globally) or 'full'")  # fmt: skip
    options = dict(options or {})
    if kind == "full":
        if options:
            raise ValueError(f"full attention takes no options (got {sorted(options)})")
        student_config = config
    else:
        chosen = None if blocks is None or sorted(blocks) == list(range(config.depth)) else sorted(blocks)
        student_config = config.replace(attention=kind, attention_options={**options, **({"blocks": chosen} if chosen
                                                                                         else {})})  # fmt: skip
    return copy_shared(network, student_config)


def parallel_pairs(network: DiT) -> DiT:
    """A copy of ``network`` with blocks ``(2i, 2i + 1)`` made one parallel block each (depth halves)."""
    config = network.config
    if config.block != "dit":
        raise ValueError(f"this network has {config.block!r} blocks; pair the blocks of a sequential DiT")
    if config.depth % 2:
        raise ValueError(f"a {config.depth}-block DiT cannot be paired; parallel pairs need an even depth")
    paired = config.replace(block="parallel-pair", depth=config.depth // 2)
    renames = {}
    for index in range(config.depth):
        half = "first" if index % 2 == 0 else "second"
        renames[f"blocks.{index}."] = f"blocks.{index // 2}.{half}."
    return copy_shared(network, paired, renames)


def copy_shared(network: DiT, config: DiTConfig, renames: dict[str, str] | None = None) -> DiT:
    """``config`` built, with every tensor of ``network`` whose (renamed) name and shape it has copied in."""
    student = config.build().to(next(network.parameters()).device)
    target = student.state_dict()
    copied = {}
    for name, tensor in network.state_dict().items():
        for old, new in (renames or {}).items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name in target and target[name].shape == tensor.shape:
            copied[name] = tensor
    missing = [name for name in target if name not in copied and ".operator." not in name]
    if missing:
        raise RuntimeError(f"grafting left non-operator weights uninitialised: {missing[:4]}")
    with torch.no_grad():
        student.load_state_dict(copied, strict=False)
    return student.train(network.training)
