"""Where a token sits: DiT's fixed 2-D sin-cos table, its PixArt/SD3 variants, and FLUX's rotary positions.

- ``sincos`` (Vaswani et al., 2017; 2-D as in MAE and DiT): the x half of each embedding from the column, the y half
  from the row. PixArt scales the grid to a ``base_size`` and an ``interpolation_scale`` (coordinates
  ``i / (grid / base_size) / interpolation_scale``); SD3 builds the table on a ``max_size`` grid and crops its centre.
  With the defaults (``base_size`` = grid, scale 1, no crop) it is DiT's table.
- ``rope`` (Su et al., 2021, "RoFormer"; FLUX.1's axes): every token has integer coordinates on named axes (FLUX:
  ``(0, row, column)`` for image tokens, all zero for text tokens); each axis rotates its own slice of the head
  dimension, pairs of adjacent channels at frequencies ``theta^(-2i/dim)``. Text tokens at position 0 are not rotated.

Checked against diffusers 0.42.1 (``get_2d_sincos_pos_embed``, ``PatchEmbed.cropped_pos_embed``, ``FluxPosEmbed``,
``apply_rotary_emb`` with ``use_real_unbind_dim=-1``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """``(M,)`` positions -> ``(M, dim)`` as ``[sin(pos w), cos(pos w)]``, ``w_i = 10^4^(-i / (dim/2))``."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int, base_size: float | None = None, interpolation_scale: float = 1.0,
              max_size: int | None = None) -> np.ndarray:  # fmt: skip
    """The fixed position table ``(grid^2, dim)``: first half columns (x), second half rows (y).

    ``base_size``/``interpolation_scale`` scale the coordinates (PixArt); ``max_size`` builds the table on that grid
    and crops its centre ``grid x grid`` (SD3). The defaults give DiT's table.
    """
    side = max_size or grid_size
    if side < grid_size:
        raise ValueError(f"position max_size={max_size} is smaller than the token grid {grid_size}")
    coords = np.arange(side, dtype=np.float64) / (side / (base_size or side)) / interpolation_scale
    grid_w, grid_h = np.meshgrid(coords, coords)
    table = np.concatenate([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], axis=1)
    if side == grid_size:
        return table
    start = (side - grid_size) // 2
    table = table.reshape(side, side, dim)[start : start + grid_size, start : start + grid_size]
    return table.reshape(grid_size * grid_size, dim)


SINCOS_OPTIONS = {"base_size", "interpolation_scale", "max_size"}
ROPE_OPTIONS = {"theta", "axes_dims"}


def position_table(dim: int, grid_size: int, options: dict) -> torch.Tensor:
    """The ``(1, grid^2, dim)`` sin-cos table ``position_options`` describe."""
    unknown = sorted(set(options) - SINCOS_OPTIONS)
    if unknown:
        raise ValueError(f"unknown sincos position options {unknown}; known: {sorted(SINCOS_OPTIONS)}")
    return torch.from_numpy(sincos_2d(dim, grid_size, **options)).float().unsqueeze(0)


class RotaryPositions(nn.Module):
    """Rotary embedding of ``[text; image]`` sequences: ``rope(q or k (B, H, S, Dh)) -> rotated``.

    The last ``grid^2`` tokens are the image (row-major), the ones before are text (position 0, unrotated).
    ``axes_dims`` split the head dimension: three axes ``(id, row, column)`` as FLUX, or two ``(row, column)``.
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0,
                 axes_dims: list[int] | tuple[int, ...] | None = None) -> None:  # fmt: skip
        super().__init__()
        if axes_dims is None:
            quarter = head_dim // 4 // 2 * 2
            axes_dims = (head_dim - 2 * quarter, quarter, quarter)
        axes_dims = tuple(int(d) for d in axes_dims)
        if sum(axes_dims) != head_dim or any(d % 2 for d in axes_dims) or len(axes_dims) not in (2, 3):
            raise ValueError(f"rope axes_dims {list(axes_dims)} must be 2 or 3 even sizes summing to the head "
                             f"dimension {head_dim}")  # fmt: skip
        self.head_dim, self.grid_size, self.theta, self.axes_dims = head_dim, grid_size, float(theta), axes_dims
        rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
        image = [rows.reshape(-1), cols.reshape(-1)]
        image = ([np.zeros(grid_size**2)] if len(axes_dims) == 3 else []) + image
        # plain tensors, not buffers: recomputed by nothing, so a network rebuilt on the meta device and materialised
        # with to_empty (FSDP2's gathered copy) keeps them; moved to the input's device on use
        self.image_cos, self.image_sin = self._angles(np.stack(image, axis=1))

    def _angles(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids (S, axes)`` -> ``cos, sin (S, head_dim)``, each angle repeated for its channel pair (float64 math)."""
        parts = []
        for axis, dim in enumerate(self.axes_dims):
            freqs = 1.0 / self.theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)
            parts.append(np.outer(ids[:, axis].astype(np.float64), freqs))
        angles = torch.from_numpy(np.concatenate(parts, axis=1))
        return (angles.cos().repeat_interleave(2, dim=1).float(), angles.sin().repeat_interleave(2, dim=1).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length, image = x.shape[-2], self.grid_size**2
        if length < image:
            raise ValueError(f"rotary positions for a {self.grid_size}x{self.grid_size} grid got {length} tokens")
        text = length - image
        if self.image_cos.device != x.device:
            self.image_cos, self.image_sin = self.image_cos.to(x.device), self.image_sin.to(x.device)
        cos = torch.cat([torch.ones(text, self.head_dim, device=x.device), self.image_cos])
        sin = torch.cat([torch.zeros(text, self.head_dim, device=x.device), self.image_sin])
        pairs = x.float().reshape(*x.shape[:-1], self.head_dim // 2, 2)
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return (x.float() * cos + rotated * sin).to(x.dtype)


def rotary_positions(config) -> RotaryPositions | None:
    """The rotary embedding a config's attention applies (None unless ``positions: rope``)."""
    if config.positions != "rope":
        return None
    options = dict(config.position_options)
    unknown = sorted(set(options) - ROPE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown rope position options {unknown}; known: {sorted(ROPE_OPTIONS)}")
    return RotaryPositions(config.attention_head_dim, config.grid_size, **options)
