"""The scene CLIP (CLIP: Radford et al., 2021; CLIPScore: Hessel et al., 2021) seen through ditlab's two frozen-
encoder slots: its image tower as an alignment target (``encoder: scene-clip`` for REPA, HASTE and REG) and its
text tower as the text-encoder kind ``scene-clip`` that text-conditioned DiTs read.

The network itself (recipe, training, cache) lives in :mod:`ditlab.metrics.scene_clip`, where CLIP score and scene
FID use it too; this module only adapts it. The text kind is registered here because ``ditlab.plugins`` imports
the method families when a config names a kind the core does not know.

Image tower outputs follow DINOv2's conventions as the other encoders do: patch tokens ``(B, 64, width)`` and the
class token after the final LayerNorm (``ln_post``), attention maps of chosen blocks recomputed from each block's
``ln_1`` and fused ``in_proj`` (open_clip's blocks do not return them), softmaxed over patch keys only. Text:
tokens after the final LayerNorm ``(B, 32, text_width)``, the pooled vector is the CLIP text embedding
(end-of-text token, projected), the mask covers start..end-of-text; the empty caption is the null condition.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ditlab.methods.align.encoders.base import EncoderInfo, EncoderOutput, FrozenEncoder, patch_attention
from ditlab.metrics.scene_clip import FIRST_RECIPE, SceneCLIP, SceneCLIPRecipe, scene_clip
from ditlab.models.text import TextEncoder, TextFeatures, register_text_encoder


def scene_clip_info(recipe: SceneCLIPRecipe = SceneCLIPRecipe()) -> EncoderInfo:
    """Feature width, heads and depth of the scene CLIP's image tower, without building it."""
    return EncoderInfo(recipe.width, recipe.width // recipe.head_width, recipe.layers)


class SceneCLIPEncoder(FrozenEncoder):
    """The scene CLIP's image tower as an alignment target: RGB pixels in [-1, 1], any size (resized to 32x32)."""

    name = "scene-clip"
    channels = (3,)

    def __init__(self, model: SceneCLIP) -> None:
        super().__init__()
        self.model = model.eval()
        self.info = scene_clip_info(model.recipe)
        self.scores, self.train_seconds = model.scores, model.train_seconds

    @staticmethod
    def block_logits(block: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Pre-softmax logits ``(B, H, T, T)`` of an open_clip block (``ln_1`` and ``nn.MultiheadAttention``)."""
        attn = block.attn
        batch, count, dim = tokens.shape
        heads = attn.num_heads
        q, k, _ = F.linear(block.ln_1(tokens), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k = (x.reshape(batch, count, heads, dim // heads).transpose(1, 2).float() for x in (q, k))
        return (q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)

    def encode(self, images: torch.Tensor, grid: int, attention: set[int]) -> EncoderOutput:
        size = self.model.recipe.image_size
        pixels = images.clamp(-1, 1).float()
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=pixels.shape[-1] > size)  # fmt: skip
        visual = self.model.clip.visual
        tokens = visual._embeds(pixels)
        maps = {}
        for index, block in enumerate(visual.transformer.resblocks):
            if index in attention:
                maps[index] = patch_attention(self.block_logits(block, tokens), skip=1)
            tokens = block(tokens)
        tokens = visual.ln_post(tokens)
        return EncoderOutput(tokens[:, 1:], maps, self.model.grid, class_token=tokens[:, 0])


def scene_clip_encoder(cache_dir: str | Path | None = None) -> SceneCLIPEncoder:
    """The scene CLIP's image tower, trained once and cached (``ditlab.metrics.scene_clip``)."""
    return SceneCLIPEncoder(scene_clip(cache_dir))


class SceneCLIPText(TextEncoder):
    """The scene CLIP's text tower: ``captions -> TextFeatures(tokens (B, 32, W), pooled (B, E), mask)``."""

    name = "scene-clip"

    def __init__(self, model: SceneCLIP) -> None:
        super().__init__()
        self.model = model.eval()
        recipe = model.recipe
        self.dim, self.pooled_dim, self.max_length = recipe.text_width, recipe.embed_dim, recipe.context_length

    def encode(self, captions: list[str]) -> TextFeatures:
        pooled, tokens, mask = self.model.text_tokens(captions)
        return TextFeatures(tokens, pooled, mask)


def recipe_from(recipe: dict | None) -> SceneCLIPRecipe:
    """``SceneCLIPRecipe(**recipe)``: fields not given take today's defaults; an unknown field is one line."""
    unknown = sorted(set(recipe or {}) - {f.name for f in fields(SceneCLIPRecipe)})
    if unknown:
        raise ValueError(f"scene-clip recipe fields {unknown} do not exist; known: "
                         f"{sorted(f.name for f in fields(SceneCLIPRecipe))}")  # fmt: skip
    return SceneCLIPRecipe(**(recipe or {}))


def pin_recipe(options: dict) -> dict:
    """``options`` with the whole recipe spelt out, so a later change of the default recipe cannot change which
    weights a recorded network reads its captions with."""
    return {**options, "recipe": asdict(recipe_from(options.get("recipe")))}


@register_text_encoder("scene-clip", pin=pin_recipe, unpinned={"recipe": asdict(FIRST_RECIPE)})
def scene_clip_text(cache_dir: str | None = None, recipe: dict | None = None) -> SceneCLIPText:
    """The scene CLIP's text tower of ``recipe`` (fields of ``SceneCLIPRecipe``; today's default when None), trained
    once and cached under ``cache_dir`` or ``$DITLAB_CACHE``."""
    return SceneCLIPText(scene_clip(cache_dir, recipe_from(recipe)))
