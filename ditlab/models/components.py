"""Component slots of a DiT block: registries of attention and feed-forward (MLP) components.

A :class:`~ditlab.models.config.DiTConfig` names its components (``attention="full"``, ``mlp="dense"``);
a block asks the registry to build them from the config. A method adds a kind by registering a builder
``(config: DiTConfig) -> nn.Module`` from its own module, never by editing the core:

    @register_mlp("toy")
    def toy_mlp(config):
        return ToyMLP(config.hidden_size, **config.mlp_options)

What a component must do (the rest of ditlab asks it, rather than reaching into its weights):

- attention: ``forward(tokens (B, N, D), return_map=False) -> (out (B, N, D), map (B, H, N, N) or None)``;
  a component that cannot give maps raises ``ValueError`` (one line) when one is asked for;
- MLP: ``forward(tokens (B, N, D)) -> (B, N, D)``;
- both: ``macs(num_tokens) -> int``, multiply-accumulates per image (FLOP counting refuses a component
  without it, by name);
- optionally ``aux_losses``: a dict of loss terms (``loss_balance``, ...) that a training forward leaves on the
  component; :func:`pop_aux_losses` collects them and the training module adds and logs them;
- optionally ``activated_parameters() -> int``: the parameters one token uses (sparse experts); default all.

A builder that also takes a ``block`` keyword is given the index of the block it builds for, so a kind can
differ by block (sparse experts in chosen blocks only, dense elsewhere).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ditlab.models.config import DiTConfig

Builder = Callable[["DiTConfig"], nn.Module]
ATTENTION: dict[str, Builder] = {}
MLP: dict[str, Builder] = {}
BLOCK: dict[str, Builder] = {}
TRUNK: dict[str, Builder] = {}
CONDITION: dict[str, Builder] = {}
_SLOTS = {"attention": ATTENTION, "mlp": MLP, "block": BLOCK, "trunk": TRUNK, "condition": CONDITION}


def _register(slot: str, name: str) -> Callable[[Builder], Builder]:
    registry = _SLOTS[slot]

    def add(builder: Builder) -> Builder:
        known = registry.get(name)
        if known is not None and getattr(known, "__qualname__", None) != getattr(builder, "__qualname__", None):
            raise ValueError(f"{slot} kind {name!r} is already registered (by {known.__module__}); pick another name")
        registry[name] = builder
        return builder

    return add


def register_attention(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(config) -> module`` becomes the attention kind ``name``."""
    return _register("attention", name)


def register_mlp(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(config) -> module`` becomes the feed-forward kind ``name``."""
    return _register("mlp", name)


def register_block(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(config, block=index) -> module`` becomes the block kind ``name`` (``dit`` is DiT's
    block). A block kind is called ``block(tokens, cond) -> tokens`` and counts ``macs(num_tokens, config)``."""
    return _register("block", name)


def register_trunk(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(config) -> module`` becomes the trunk kind ``name``: what runs the blocks between
    ``embed`` and ``head`` when a network routes compute dynamically (``blocks``, the default, runs every block on
    every token and needs no module). A trunk is called ``trunk(dit, tokens, cond, t) -> tokens`` (``t: (B,)``, the
    network's time input, for routers that see the timestep alone) and counts its own overhead
    ``macs(num_tokens)``; like a component it may leave ``aux_losses``."""
    return _register("trunk", name)


def register_condition(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(config) -> module`` becomes the condition kind ``name`` (``class``, ``text``): the
    network's ``y_embedder``, whose ``condition(t_emb, y, force_drop_ids) -> cond`` turns the timestep embedding and
    the condition input into what the blocks and the head read (``ditlab.models.condition``)."""
    return _register("condition", name)


def build_component(slot: str, config: DiTConfig, block: int | None = None) -> nn.Module:
    """The ``slot`` (``attention``, ``mlp``, ``block``, ``trunk`` or ``condition``) component ``config`` names, for block ``block``.
    An unknown name loads the installed families once (``ditlab.plugins``) before it is refused, so a config or
    checkpoint naming a method's kind builds without its caller importing the method first."""
    name = getattr(config, slot)
    registry = _SLOTS[slot]
    if name not in registry and slot == "block":
        import ditlab.models.blocks  # noqa: F401 - the core's text-conditioned block kinds
    if name not in registry:
        from ditlab.plugins import load_plugins

        load_plugins()
    if name not in registry:
        raise ValueError(f"unknown {slot} kind {name!r}; registered: {sorted(registry)} (no method family or "
                         f"'ditlab.plugins' entry point registers {name!r})")  # fmt: skip
    builder = registry[name]
    if block is not None and "block" in inspect.signature(builder).parameters:
        return builder(config, block=block)
    return builder(config)


def block_kind_trait(config: DiTConfig, trait: str) -> bool:
    """Whether ``config``'s block kind declares ``trait`` (its registered builder or class sets it true):
    ``joint_text`` (carries ``[text; image]`` tokens), ``token_grid`` (convolves the square token grid). A trunk
    that reshapes tokens asks this when it is built, so it refuses a block kind it cannot run in one line."""
    if config.block not in BLOCK:
        import ditlab.models.blocks  # noqa: F401 - the core's text-conditioned block kinds
    builder = BLOCK.get(config.block)
    return bool(getattr(builder, trait, False))


def component_macs(component: nn.Module, kind: str, num_tokens: int) -> int:
    """Multiply-accumulates per image of a block component; refuses a component that cannot count them."""
    macs = getattr(component, "macs", None)
    if macs is None:
        raise ValueError(f"the {kind!r} component ({type(component).__name__}) does not count its FLOPs; "
                         "give it a macs(num_tokens) method")  # fmt: skip
    return int(macs(num_tokens))


def pop_aux_losses(network: nn.Module) -> dict[str, torch.Tensor]:
    """Auxiliary loss terms the components of ``network`` left in their last forward, summed by name and
    cleared (so a term is added once per training step)."""
    totals: dict[str, torch.Tensor] = {}
    for module in network.modules():
        terms = getattr(module, "aux_losses", None)
        if not terms:
            continue
        for name, value in terms.items():
            totals[name] = totals[name] + value if name in totals else value
        module.aux_losses = {}
    return totals
