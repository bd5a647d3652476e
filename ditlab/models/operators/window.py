"""``window``: sliding-window attention, square on the 2-D token grid or 1-D over the raster sequence.

The 1-D raster form is Grafting's SWA (Chandrasegaran et al., "Exploring Diffusion Transformer Designs via
Grafting", NeurIPS 2025, https://github.com/keshik6/grafting: flash-attn window ``(w, w)`` over the raster
sequence); the 2-D form is its square analogue on the grid ([interp]: the grid is what an image DiT sees).
``window = w`` is the half-width: a query sees keys with ``|di| <= w and |dj| <= w`` (2-D) or ``|n - n'| <= w``
(raster), so any ``w >= N`` is full attention.

    attention: window
    attention_options: {window: 2, layout: 2d}   # layout: 2d | raster; optional: blocks, kernel
"""

from __future__ import annotations

from typing import Any

import torch

from ditlab.models.config import DiTConfig
from ditlab.models.operators.grid import neighbour_index, raster_index, token_grid
from ditlab.models.operators.neighbourhood import NeighbourhoodOperator
from ditlab.models.operators.registry import check_options, register_operator

LAYOUTS = ("2d", "raster")


class WindowAttention(NeighbourhoodOperator):
    """Square (``2d``) or raster (1-D) sliding-window attention of half-width ``window``."""

    name = "window"

    def __init__(self, window: int, layout: str = "2d", kernel: str = "auto") -> None:
        super().__init__(kernel)
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"attention_options.window={window!r} for 'window' must be an integer >= 1 (the half-width)")
        if layout not in LAYOUTS:
            raise ValueError(f"attention_options.layout={layout!r} for 'window'; choices: {list(LAYOUTS)}")
        self.window, self.layout = window, layout

    def neighbours(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layout == "raster":
            return raster_index(min(self.window, num_tokens), num_tokens, device)
        height, width = token_grid(num_tokens)
        reach = min(self.window, max(height, width))
        offsets = [(di, dj) for di in range(-reach, reach + 1) for dj in range(-reach, reach + 1)]
        return neighbour_index(offsets, height, width, device)

    def extra_repr(self) -> str:
        return f"window={self.window}, layout={self.layout}, kernel={self.kernel}"


def build_window(config: DiTConfig, options: dict[str, Any]) -> WindowAttention:
    check_options("window", options, ("window", "layout", "kernel"))
    if "window" not in options:
        raise ValueError("the 'window' attention needs attention_options.window (the half-width, e.g. 2)")
    return WindowAttention(**options)


register_operator("window", build_window)
