"""Registering an operator as an attention kind, with the options every kind shares (``blocks``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from ditlab.models.attention import Attention
from ditlab.models.components import register_attention
from ditlab.models.config import DiTConfig

OperatorFactory = Callable[[DiTConfig, dict[str, Any]], nn.Module]


def check_options(kind: str, options: dict[str, Any], known: Iterable[str]) -> None:
    """Refuse option names the kind does not know, in one line naming them."""
    unknown = sorted(set(options) - set(known) - {"blocks"})
    if unknown:
        raise ValueError(f"unknown attention_options {unknown} for the {kind!r} attention; known: "
                         f"{sorted({*known, 'blocks'})}")  # fmt: skip


def grafted_blocks(kind: str, blocks: Any, depth: int) -> set[int] | None:
    """``attention_options.blocks`` checked: None (every block) or a set of 0-based block indices."""
    if blocks is None:
        return None
    if not isinstance(blocks, (list, tuple)) or not all(isinstance(b, int) for b in blocks):
        raise ValueError(f"attention_options.blocks={blocks!r} for {kind!r} must be a list of block indices")
    outside = sorted(b for b in blocks if not 0 <= b < depth)
    if outside:
        raise ValueError(f"attention_options.blocks has {outside} outside 0..{depth - 1} for a {depth}-block DiT")
    return set(blocks)


def register_operator(kind: str, factory: OperatorFactory) -> None:
    """Make ``factory(config, options) -> operator`` the attention kind ``kind``; blocks outside
    ``attention_options.blocks`` get full attention."""

    def build(config: DiTConfig, block: int | None = None) -> Attention:
        options = dict(config.attention_options)
        chosen = grafted_blocks(kind, options.pop("blocks", None), config.depth)
        operator = factory(config, options)  # built (and checked) even for full blocks: errors surface once
        if chosen is not None and block is not None and block not in chosen:
            return Attention.from_config(config)
        return Attention.from_config(config, operator)

    build.__qualname__ = f"register_operator.{kind}"  # one qualname per kind: a re-import re-registers cleanly
    register_attention(kind)(build)
