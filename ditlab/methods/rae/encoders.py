"""The frozen representation encoder of an RAE: ``encoder.tokens(images in [-1, 1]) -> (B, grid^2, F)``.

Kinds (``rae_encoder(name, **options)``):

- ``digits-vit``, ``scene-clip``: ditlab's self-trained encoders (:mod:`ditlab.methods.align.encoders`; 1x16x16
  digits -> 4x4 tokens of width 64, 3x32x32 scenes -> 8x8 tokens of width 64), trained once and cached;
- ``dinov2-vit{s,b,l,g}14[_reg]``: DINOv2 through ditlab's torch-hub loader from a local clone and weight file
  (options ``weights``, ``repo``; ``grid``, default 16: RAE's 224 px input, 16x16 patches of 14 px);
- ``siglip2``, ``mae``, ``dinov2-hf``: a local ``transformers`` folder (option ``path``, or ``DITLAB_SIGLIP_MODEL`` /
  ``DITLAB_MAE_MODEL`` / ``DITLAB_DINOV2_MODEL``), as RAE's ``SigLIP2wNorm``, ``MAEwNorm`` and ``Dinov2withNorm``:
  the last hidden state's patch tokens with the final LayerNorm's affine removed (MAE unshuffled: its noise is the
  identity order, no masking). Nothing is downloaded; a missing folder, config or weight file is one line.

Tokens are the encoder's final normalised patch tokens (class and register tokens dropped). The RAE standardises
them per element with dataset statistics (:mod:`ditlab.methods.rae.autoencoder`), so the affine of a final LayerNorm
that ditlab's own encoders keep does not change the latent space's scale.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HF_KINDS = {  # name -> (environment variable, default mean, default std)
    "siglip2": ("DITLAB_SIGLIP_MODEL", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "mae": ("DITLAB_MAE_MODEL", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "dinov2-hf": ("DITLAB_DINOV2_MODEL", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def weights_digest(module: nn.Module) -> str:
    """A short hash of a module's tensors (names, shapes, values): what makes two encoders the same."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:12]


class RepresentationEncoder(nn.Module):
    """A frozen encoder: ``tokens(images (B, C, S, S) in [-1, 1]) -> (B, grid^2, feature_dim)``."""

    name: str = "encoder"
    channels: tuple[int, ...] = (3,)
    feature_dim: int = 0
    grid: int = 0

    def __init__(self, options: dict | None = None) -> None:
        super().__init__()
        self.options = dict(options or {})
        self._digest: str | None = None

    def train(self, mode: bool = True) -> RepresentationEncoder:
        return super().train(False)

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in self.channels:
            raise ValueError(f"RAE encoder {self.name} takes images (B, {' or '.join(map(str, self.channels))}, H, W) "
                             f"in [-1, 1], got {tuple(images.shape)}")  # fmt: skip
        tokens = self.encode_tokens(images.float())
        if tokens.shape[1] != self.grid**2:
            raise ValueError(f"RAE encoder {self.name} gave {tokens.shape[1]} tokens, expected a {self.grid}x{self.grid} grid")
        return tokens

    def identity(self) -> dict:
        """Name, options (paths dropped: they differ between machines) and a hash of the weights."""
        if self._digest is None:
            self._digest = weights_digest(self)
        options = {key: value for key, value in self.options.items() if key not in ("path", "weights", "repo",
                                                                                    "cache_dir")}  # fmt: skip
        return {"name": self.name, "options": options, "weights_hash": self._digest}


class AlignedEncoder(RepresentationEncoder):
    """One of ditlab's alignment encoders (``digits-vit``, ``scene-clip``, DINOv2) at its own (or a chosen) grid."""

    def __init__(self, name: str, encoder: nn.Module, grid: int, options: dict) -> None:
        super().__init__(options)
        self.name, self.encoder, self.grid = name, encoder, grid
        self.channels = tuple(encoder.channels)
        self.feature_dim = encoder.info.feature_dim

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images, self.grid).features


def aligned_encoder(name: str, grid: int | None = None, weights: str | None = None, repo: str | None = None,
                    cache_dir: str | None = None) -> AlignedEncoder:  # fmt: skip
    from ditlab.methods.align.encoders import load_encoder

    encoder = load_encoder(name, weights=weights, repo=repo, cache_dir=cache_dir)
    own = {"digits-vit": lambda: encoder.network.recipe.grid, "scene-clip": lambda: encoder.model.grid}
    if grid is None:
        grid = own[name]() if name in own else 16
    elif name in own and grid != own[name]():
        raise ValueError(f"RAE encoder {name} has a fixed {own[name]()}x{own[name]()} token grid; drop grid={grid}")
    options = {"grid": grid} if name not in own else {}
    return AlignedEncoder(name, encoder.requires_grad_(False), grid, options)


def transformers_folder(kind: str, path: str | None) -> Path:
    """The local ``transformers`` folder of ``kind``: ``path``, else its environment variable; one line if absent."""
    variable = HF_KINDS[kind][0]
    explicit = path or os.environ.get(variable)
    if not explicit:
        raise FileNotFoundError(f"RAE encoder {kind} reads a local transformers folder: set encoder_options.path (or "
                                f"{variable}) to a copy downloaded on a networked machine")  # fmt: skip
    folder = Path(explicit).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"RAE encoder {kind}: {folder} has no config.json; point encoder_options.path (or "
                                f"{variable}) at a transformers model folder")  # fmt: skip
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"RAE encoder {kind}: {folder} has no weights (*.safetensors or *.bin); copy the "
                                "model's weight files beside its config.json")  # fmt: skip
    return folder


def drop_affine(norm: nn.LayerNorm) -> None:
    """RAE's "wNorm" encoders: the final LayerNorm without its affine (unit-scale tokens)."""
    norm.elementwise_affine = False
    norm.weight = None
    norm.bias = None


class TransformersEncoder(RepresentationEncoder):
    """SigLIP2 / MAE / DINOv2 (with registers) from a local ``transformers`` folder, RAE's preprocessing."""

    def __init__(self, kind: str, path: str | None = None, input_size: int | None = None) -> None:
        folder = transformers_folder(kind, path)
        super().__init__({"path": str(folder), "input_size": input_size})
        import transformers

        config = json.loads((folder / "config.json").read_text())
        vision = config.get("vision_config", config)
        self.name, self.kind = kind, kind
        if kind == "siglip2":
            model = transformers.SiglipVisionModel.from_pretrained(folder, local_files_only=True)
            drop_affine(getattr(model, "vision_model", model).post_layernorm)  # transformers 4 nests it, 5 does not
        elif kind == "mae":
            model = transformers.ViTMAEModel.from_pretrained(folder, local_files_only=True, mask_ratio=0.0)
            drop_affine(model.layernorm)
        else:
            model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
            drop_affine(model.layernorm)
        self.model = model.requires_grad_(False).eval()
        self.patch_size = int(vision["patch_size"])
        self.input_size = int(input_size or vision.get("image_size", 224))
        if self.input_size % self.patch_size:
            raise ValueError(f"RAE encoder {kind}: input_size {self.input_size} is not a multiple of its patch "
                             f"{self.patch_size}")  # fmt: skip
        self.grid = self.input_size // self.patch_size
        self.feature_dim = int(vision["hidden_size"])
        self.skip = 0 if kind == "siglip2" else 1 + int(vision.get("num_register_tokens", 0) or 0)
        mean, std = self.preprocessing(folder, kind)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.channels = (1, 3)
        self.options = {"input_size": self.input_size, "path": str(folder)}

    @staticmethod
    def preprocessing(folder: Path, kind: str) -> tuple[tuple, tuple]:
        processor = folder / "preprocessor_config.json"
        if processor.is_file():
            values = json.loads(processor.read_text())
            if "image_mean" in values and "image_std" in values:
                return tuple(values["image_mean"]), tuple(values["image_std"])
        return HF_KINDS[kind][1], HF_KINDS[kind][2]

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.clamp(-1, 1) + 1) / 2
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        if pixels.shape[-1] != self.input_size or pixels.shape[-2] != self.input_size:
            pixels = F.interpolate(pixels, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        pixels = (pixels - self.mean) / self.std
        if self.kind == "mae":  # identity "noise" keeps every patch in raster order (RAE's MAEwNorm)
            order = torch.arange(self.grid**2, device=pixels.device, dtype=pixels.dtype).expand(len(pixels), -1)
            hidden = self.model(pixels, noise=order, interpolate_pos_encoding=True).last_hidden_state
        else:
            hidden = self.model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        return hidden[:, self.skip :]


ALIGNED = ("digits-vit", "scene-clip")


def rae_encoder(name: str, **options) -> RepresentationEncoder:
    """The frozen representation encoder ``name`` with its ``options`` (see the module docstring)."""
    from ditlab.methods.align.encoders import DINOV2

    if name in ALIGNED or name in DINOV2:
        return aligned_encoder(name, **options)
    if name in HF_KINDS:
        return TransformersEncoder(name, **options)
    raise ValueError(f"unknown RAE encoder {name!r}; choices: {[*ALIGNED, *DINOV2, *HF_KINDS]}")

