"""Frozen vision encoders whose patch features and attention maps are alignment targets (REPA, HASTE).

Two families behind one call, ``encoder(images, grid, attention=[...]) -> EncoderOutput``:

- ``digits-vit``: a small ViT (16x16 input, patch 4, width 64, 4 heads, 4 blocks) that ditlab trains
  itself on scikit-learn's digits in seconds, deterministically, cached under ``$DITLAB_CACHE`` by a hash
  of its recipe. Its objective is **self-supervised masked-patch prediction** (SimMIM-style: half the
  patches are replaced by a mask token and their pixels regressed from the encoder's output), because
  (i) REPA's best targets (DINOv2) are self-supervised, and (ii) no labels means it is trained on a
  different objective *and* is a different network from the FID feature network (``digits-classifier``,
  a supervised CNN), so aligning to it never optimises the evaluation metric directly. Its linear-probe
  accuracy is measured and cached as a sanity check of what it learnt.
- ``scene-clip``: the image tower of ditlab's scene CLIP (``ditlab.metrics.scene_clip``; patch 4 on 32x32 RGB
  digit scenes, an 8x8 grid), trained contrastively on captions, cached like ``digits-vit``; RGB input only.
- ``dinov2-vit{s,b,l,g}14[_reg]``: DINOv2 (Oquab et al., 2023) through ``torch.hub`` from a *local* clone
  of facebookresearch/dinov2 and a local weight file; nothing is downloaded. Preprocessing follows REPA:
  [0, 1] pixels, ImageNet mean/std, then bicubic resize to ``14 * grid`` so the patch grid equals the
  DiT's token grid.

Inputs are clean pixels in [-1, 1] (``digits-vit``: 1 channel; DINOv2: 3, or 1 repeated); anything else, VAE
latents above all, is refused in one line before the encoder runs. On latents the data module supplies the
images (``LatentDataModule(pixels=True)``).

Outputs are patch tokens (CLS and register tokens dropped) after the final LayerNorm, like DINOv2's
``x_norm_patchtokens``, the CLS token after the same norm (``class_token``, as ``x_norm_clstoken``: REG's
target), and attention maps ``(B, H, N, N)`` renormalised over patch keys (the CLS row and column removed
before the softmax, as HASTE does). Block indices are 0-based. When the encoder's grid
differs from the requested one, features are resampled bilinearly on the 2-D patch grid (antialiased when
shrinking) and attention maps bilinearly along both the query and the key grid, rows renormalised.
"""

from __future__ import annotations

from ditlab.methods.align.encoders.base import (
    EncoderInfo,
    EncoderOutput,
    FrozenEncoder,
    patch_attention,
    resample_attention,
    resample_features,
)
from ditlab.methods.align.encoders.digits_vit import DigitsViT, DigitsViTEncoder, DigitsViTRecipe, digits_vit
from ditlab.methods.align.encoders.dinov2 import DINOV2, DINOv2Encoder, dinov2
from ditlab.methods.align.encoders.scene_clip import SceneCLIPEncoder, scene_clip_encoder, scene_clip_info

ENCODERS = ("digits-vit", "scene-clip", *DINOV2)


def encoder_info(name: str) -> EncoderInfo:
    """Feature width, heads and depth of ``name`` without loading it."""
    if name == "digits-vit":
        recipe = DigitsViTRecipe()
        return EncoderInfo(recipe.dim, recipe.num_heads, recipe.depth)
    if name == "scene-clip":
        return scene_clip_info()
    if name in DINOV2:
        return DINOV2[name][1]
    raise ValueError(f"unknown encoder {name!r}; choices: {list(ENCODERS)}")


def load_encoder(name: str, weights: str | None = None, repo: str | None = None,
                 cache_dir: str | None = None) -> FrozenEncoder:  # fmt: skip
    """The frozen encoder ``name`` (``digits-vit``, ``scene-clip`` or a DINOv2 model), in eval mode, no gradients."""
    encoder_info(name)
    if name == "digits-vit":
        return digits_vit(cache_dir)
    if name == "scene-clip":
        return scene_clip_encoder(cache_dir)
    return dinov2(name, weights, repo)


__all__ = [
    "DINOV2",
    "ENCODERS",
    "DINOv2Encoder",
    "DigitsViT",
    "DigitsViTEncoder",
    "DigitsViTRecipe",
    "EncoderInfo",
    "EncoderOutput",
    "FrozenEncoder",
    "SceneCLIPEncoder",
    "digits_vit",
    "dinov2",
    "encoder_info",
    "load_encoder",
    "patch_attention",
    "resample_attention",
    "resample_features",
    "scene_clip_encoder",
    "scene_clip_info",
]
