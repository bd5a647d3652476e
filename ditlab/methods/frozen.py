"""``FrozenNetwork``: the one holder for a network a method uses but never trains or saves.

Teachers (dicomp, Self-Transcendence), representation encoders (REPA, HASTE) and VAEs are loaded on first
use, kept out of ``state_dict``, the optimiser and DDP's parameter list (the holder is a plain object, so
assigning it to a LightningModule registers nothing), moved to the module's device when asked for, and
released for good when a method is done with them (HASTE's termination), never reloaded after.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch import nn


class FrozenNetwork:
    """A lazily loaded, frozen (``requires_grad=False``, eval mode) network.

    Args:
        load: builds the network; called at most once (never after :meth:`release`).
    """

    def __init__(self, load: Callable[[], nn.Module]) -> None:
        self._load = load
        self._network: nn.Module | None = None
        self.loads = 0
        """How many times ``load`` ran (tests: a released network is never loaded again)."""
        self.released = False

    @property
    def loaded(self) -> bool:
        return self._network is not None

    def get(self, device: torch.device | str | None = None) -> nn.Module:
        """The network (loaded now if it was not), on ``device`` when given."""
        if self.released:
            raise RuntimeError("this frozen network was released and is not reloaded")
        if self._network is None:
            self.set(self._load())
            self.loads += 1
        if device is not None:
            parameter = next(self._network.parameters(), None)
            if parameter is not None and parameter.device != torch.device(device):
                self._network.to(device)
        return self._network

    def set(self, network: nn.Module) -> None:
        """Hold ``network`` (already built elsewhere), frozen."""
        self._network = network.requires_grad_(False).eval()

    def release(self) -> int:
        """Drop the network for good and free its memory; returns the bytes its tensors held."""
        network, self._network, self.released = self._network, None, True
        if network is None:
            return 0
        released = sum(t.numel() * t.element_size() for t in [*network.parameters(), *network.buffers()])
        del network
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return released
