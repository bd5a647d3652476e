"""DINOv2 (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", 2023) from local files.

The model is built by ``torch.hub.load(<local clone>, "dinov2_vitb14", source="local", pretrained=False)``
and its weights read from a local file; nothing is downloaded. Missing files end in one-line
``FileNotFoundError``s that name the file, the config key and the environment variable to set.

The absolute position table (37x37 patches at 518 px) is resampled to the target grid once, bicubic with
antialiasing, as REPA, HASTE and REG do at load (``timm.layers.pos_embed.resample_abs_pos_embed`` with its
defaults), so DINOv2 then uses it as it is; left to itself, DINOv2 would interpolate at every call without
antialiasing (and with its 0.1 offset), giving other targets. The grid is the one ``encode`` is asked for, so the
table is resampled on the first call at a grid (from the loaded table, never from an earlier resampling).
Checked against sihyun-yu/REPA at 67f714503e3892f993844aab088ffc5791c92613 (``utils.py``), through timm 1.0.31:
``tests/methods/align/test_dinov2_positions.py``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.methods.align.encoders.base import EncoderInfo, EncoderOutput, FrozenEncoder, patch_attention
from ditlab.metrics.features import explicit_weight_file, weight_file_candidates

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINOV2 = {  # name -> (hub entry point, EncoderInfo)
    "dinov2-vits14": ("dinov2_vits14", EncoderInfo(384, 6, 12)),
    "dinov2-vitb14": ("dinov2_vitb14", EncoderInfo(768, 12, 12)),
    "dinov2-vitl14": ("dinov2_vitl14", EncoderInfo(1024, 16, 24)),
    "dinov2-vitg14": ("dinov2_vitg14", EncoderInfo(1536, 24, 40)),
}
DINOV2.update({f"{name}_reg": (f"{hub}_reg", info) for name, (hub, info) in list(DINOV2.items())})
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"


def resample_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """``(1, 1 + s*s, D) -> (1, 1 + grid*grid, D)``: the class position kept, the patch positions resampled on
    their 2-D grid, bicubic with antialiasing (in float32, back to the table's dtype), as REPA does at load."""
    side = math.isqrt(table.shape[1] - 1)
    if side * side != table.shape[1] - 1:
        raise ValueError(f"a position table of {table.shape[1]} entries is not a class token plus a square grid")
    if side == grid:
        return table
    patches = table[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(table.dtype)
    return torch.cat([table[:, :1], patches], dim=1)


def dinov2_weight_file(name: str) -> str:
    """``dinov2-vitb14`` -> ``dinov2_vitb14_pretrain.pth``; the ``_reg`` models are ``..._reg4_pretrain.pth``."""
    hub = DINOV2[name][0]
    return f"{hub.removesuffix('_reg')}_reg4_pretrain.pth" if hub.endswith("_reg") else f"{hub}_pretrain.pth"


def dinov2_weights_path(name: str, weights: str | Path | None = None) -> Path:
    """The local weight file: ``weights``, ``$DITLAB_DINOV2_WEIGHTS``, then the torch-hub and ditlab caches."""
    filename = dinov2_weight_file(name)
    url = f"{DINOV2_URL}/{DINOV2[name][0].removesuffix('_reg')}/{filename}"
    explicit = weights or os.environ.get("DITLAB_DINOV2_WEIGHTS")
    if explicit:
        path = explicit_weight_file(explicit, filename)
        if not path.is_file():
            raise FileNotFoundError(f"DINOv2 weights {path} do not exist; set model.init_args.encoder.weights (or "
                                    f"DITLAB_DINOV2_WEIGHTS) to a local copy of {filename} from {url}")  # fmt: skip
        return path
    candidates = weight_file_candidates(filename)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"DINOv2 weights {filename} not found (looked in {', '.join(str(p.parent) for p in candidates)}); set "
        f"model.init_args.encoder.weights (or DITLAB_DINOV2_WEIGHTS) to a local copy, downloaded on a networked "
        f"machine from {url}"
    )


def dinov2_repo_path(repo: str | Path | None = None) -> Path:
    """A local clone of facebookresearch/dinov2: ``repo``, ``$DITLAB_DINOV2_REPO``, then torch hub's cache."""
    explicit = repo or os.environ.get("DITLAB_DINOV2_REPO")
    path = (
        Path(explicit).expanduser()
        if explicit
        else Path(torch.hub.get_dir()) / "facebookresearch_dinov2_main"
    )
    if not (path / "hubconf.py").is_file():
        raise FileNotFoundError(
            f"DINOv2 code {path / 'hubconf.py'} does not exist; set model.init_args.encoder.repo (or "
            "DITLAB_DINOV2_REPO) to a local clone of https://github.com/facebookresearch/dinov2"
        )
    return path


class DINOv2Encoder(FrozenEncoder):
    """DINOv2 patch tokens (``x_norm_patchtokens``) and per-block attention maps, REPA preprocessing.

    Attention maps are recomputed from each chosen block's own ``norm1`` and ``attn.qkv`` (the hub blocks
    use a fused kernel that cannot return them), so the hub code is read, never patched.
    """

    channels = (1, 3)  # grey images are repeated to RGB

    def __init__(self, name: str, model: nn.Module) -> None:
        super().__init__()
        self.name, self.model = name, model.eval()
        self.info = DINOV2[name][1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        table = getattr(model, "pos_embed", None)
        self.register_buffer("loaded_positions", None if table is None else table.detach().clone(), persistent=False)
        self.positions_grid: int | None = None

    def fit_positions(self, grid: int) -> None:
        """Resample the position table to ``grid`` (once per grid, from the loaded table)."""
        if self.loaded_positions is None or self.positions_grid == grid:
            return
        self.model.pos_embed.data = resample_positions(self.loaded_positions, grid)
        self.positions_grid = grid

    @staticmethod
    def block_logits(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Pre-softmax logits ``(B, H, T, T)`` of a timm/DINOv2 block (``norm1``, ``attn.qkv``, ``attn.scale``)."""
        attn = block.attn
        batch, count, dim = tokens.shape
        qkv = attn.qkv(block.norm1(tokens)).reshape(batch, count, 3, attn.num_heads, dim // attn.num_heads)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return (q.float() * attn.scale) @ k.float().transpose(-2, -1)

    def encode(self, images: torch.Tensor, grid: int, attention: set[int]) -> EncoderOutput:
        pixels = (images.clamp(-1, 1).float() + 1) / 2
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        pixels = (pixels - self.mean) / self.std
        side = grid * self.model.patch_size
        pixels = F.interpolate(pixels, size=(side, side), mode="bicubic", align_corners=False)
        self.fit_positions(grid)
        tokens = self.model.prepare_tokens_with_masks(pixels)
        skip = 1 + getattr(self.model, "num_register_tokens", 0)
        maps = {}
        for index, block in enumerate(self.model.blocks):
            if index in attention:
                maps[index] = patch_attention(self.block_logits(block, tokens), skip)
            tokens = block(tokens)
        tokens = self.model.norm(tokens)
        return EncoderOutput(tokens[:, skip:], maps, grid, class_token=tokens[:, 0])


def dinov2(
    name: str = "dinov2-vitb14", weights: str | Path | None = None, repo: str | Path | None = None
) -> DINOv2Encoder:
    """DINOv2 from local code and weights; a one-line ``FileNotFoundError`` names what is missing."""
    path = dinov2_weights_path(name, weights)
    code = dinov2_repo_path(repo)
    model = torch.hub.load(str(code), DINOV2[name][0], source="local", pretrained=False)
    if getattr(model, "chunked_blocks", False):
        raise ValueError(f"{name}: chunked DINOv2 blocks are not supported; build it with block_chunks=0")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return DINOv2Encoder(name, model.requires_grad_(False))
