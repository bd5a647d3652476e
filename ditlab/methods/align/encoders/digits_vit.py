"""``digits-vit``: a small ViT that ditlab pre-trains itself on the digits by masked-patch prediction.

16x16 input, patch 4 (a 4x4 grid), width 64, 4 heads, 4 blocks, CLS token, fixed sin-cos positions. Half
the patches are replaced by a mask token and a linear decoder regresses their pixels (SimMIM-style, no
labels). Deterministic (fixed seeds, deterministic kernels, one thread) and cached under ``$DITLAB_CACHE``
by a hash of its recipe; about 25 s of one CPU core.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.methods.align.encoders.base import EncoderInfo, EncoderOutput, FrozenEncoder
from ditlab.metrics.features import (
    cache_root,
    cached_training,
    one_cycle_adamw,
    recipe_digest,
    reproducible_training,
    resize_to,
)
from ditlab.models.attention import Attention
from ditlab.models.dit import sincos_2d


@dataclass(frozen=True)
class DigitsViTRecipe:
    """Everything that determines the digits ViT's weights; its hash names the cache file."""

    image_size: int = 16
    patch_size: int = 4
    dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    mask_ratio: float = 0.5
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    max_shift: int = 1
    holdout_fraction: float = 0.2
    seed: int = 0
    version: int = 1

    def digest(self) -> str:
        return recipe_digest(self)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class ViTBlock(nn.Module):
    """Pre-norm transformer block; ``return_map`` also gives the softmax map over all tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, tokens: torch.Tensor, return_map: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mixed, weights = self.attn(self.norm1(tokens), return_map)
        tokens = tokens + mixed
        return tokens + self.mlp(self.norm2(tokens)), weights


class DigitsViT(nn.Module):
    """CLS + patch tokens with fixed sin-cos positions, ``depth`` blocks, final LayerNorm, a pixel decoder.

    ``forward(images (B, 1, S, S), mask (B, N) bool | None, attention) -> (tokens (B, 1+N, D), maps)``.
    """

    def __init__(self, recipe: DigitsViTRecipe) -> None:
        super().__init__()
        self.recipe = recipe
        p, dim = recipe.patch_size, recipe.dim
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        positions = torch.from_numpy(sincos_2d(dim, recipe.grid)).float()
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, dim), positions]).unsqueeze(0))
        self.blocks = nn.ModuleList(
            ViTBlock(dim, recipe.num_heads, recipe.mlp_ratio) for _ in range(recipe.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder = nn.Linear(dim, p * p)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                attention: Iterable[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:  # fmt: skip
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)
        if mask is not None:
            patches = torch.where(mask.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        tokens = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1) + self.pos_embed
        attention, maps = set(attention), {}
        for index, block in enumerate(self.blocks):
            tokens, weights = block(tokens, index in attention)
            if weights is not None:
                maps[index] = weights
        return self.norm(tokens), maps

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, S) -> (B, N, p*p)`` in the token order of ``patch_embed``."""
        p = self.recipe.patch_size
        return F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, padding with the background (-1)."""
    if max_shift == 0:
        return images
    size = images.shape[-1]
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)])


def _random_mask(batch: int, count: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``(B, N)`` bool, exactly ``round(ratio * N)`` patches masked per image."""
    ranks = torch.rand(batch, count, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < int(round(ratio * count))


def _probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> float:
    """Held-out accuracy of a logistic-regression probe on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x.numpy())
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x.numpy()), train_y.numpy())
    return float(probe.score(scaler.transform(test_x.numpy()), test_y.numpy()))


def train_digits_vit(recipe: DigitsViTRecipe = DigitsViTRecipe()) -> tuple[DigitsViT, dict]:
    """Masked-patch pre-training on a fixed split of the digits; returns the network and held-out scores.

    Deterministic (fixed seeds, deterministic algorithms, one thread) and leaves the caller's RNG untouched.
    Scores: masked-patch MSE and the linear-probe accuracy of mean-pooled patch features (labels are used
    only by this probe, never in training), next to the probe accuracy on raw pixels for scale.
    """
    from ditlab.data.digits import digits_tensors

    images, labels = digits_tensors(recipe.image_size)
    with reproducible_training(recipe.seed, len(labels), recipe.holdout_fraction) as (generator, train, holdout):
        network = DigitsViT(recipe)
        steps = recipe.epochs * (len(train) // recipe.batch_size)
        optimizer, schedule = one_cycle_adamw(network, recipe.lr, recipe.weight_decay, steps)
        count = recipe.grid**2
        network.train()
        for _ in range(recipe.epochs):
            permutation = train[torch.randperm(len(train), generator=generator)]
            for start in range(0, len(permutation) - recipe.batch_size + 1, recipe.batch_size):
                batch = _random_shift(images[permutation[start : start + recipe.batch_size]],
                                      recipe.max_shift, generator)  # fmt: skip
                mask = _random_mask(len(batch), count, recipe.mask_ratio, generator)
                tokens, _ = network(batch, mask)
                error = (network.decoder(tokens[:, 1:]) - network.patchify(batch)) ** 2
                loss = error.mean(-1)[mask].mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        network.eval()
        with torch.no_grad():
            mask = _random_mask(len(holdout), count, recipe.mask_ratio, generator)
            tokens, _ = network(images[holdout], mask)
            error = (network.decoder(tokens[:, 1:]) - network.patchify(images[holdout])) ** 2
            pooled = network(images)[0][:, 1:].mean(1)
        scores = {
            "holdout_masked_mse": error.mean(-1)[mask].mean().item(),
            "probe_accuracy": _probe_accuracy(pooled[train], labels[train], pooled[holdout], labels[holdout]),
            "pixel_probe_accuracy": _probe_accuracy(images[train].flatten(1), labels[train],
                                                    images[holdout].flatten(1), labels[holdout]),
        }  # fmt: skip
    return network.requires_grad_(False), scores


class DigitsViTEncoder(FrozenEncoder):
    """ditlab's digits ViT as an alignment target: any input size, resized to its own 16x16 (grid 4)."""

    name = "digits-vit"
    channels = (1,)

    def __init__(self, network: DigitsViT, scores: dict, train_seconds: float | None = None) -> None:
        super().__init__()
        self.network = network.eval()
        recipe = network.recipe
        self.info = EncoderInfo(recipe.dim, recipe.num_heads, recipe.depth)
        self.scores, self.train_seconds = scores, train_seconds

    def encode(self, images: torch.Tensor, grid: int, attention: set[int]) -> EncoderOutput:
        pixels = resize_to(images.clamp(-1, 1).float(), self.network.recipe.image_size)
        tokens, maps = self.network(pixels, attention=attention)
        # The digits ViT's maps are post-softmax over CLS + patches: drop CLS, renormalise over patch keys.
        patch_maps = {i: m[..., 1:, 1:] / m[..., 1:, 1:].sum(-1, keepdim=True) for i, m in maps.items()}
        return EncoderOutput(tokens[:, 1:], patch_maps, self.network.recipe.grid, class_token=tokens[:, 0])


def digits_vit(cache_dir: str | Path | None = None, recipe: DigitsViTRecipe = DigitsViTRecipe(),
               retrain: bool = False) -> DigitsViTEncoder:  # fmt: skip
    """The digits ViT, trained once per recipe, then loaded from ``<cache>/digits-vit-<hash>.pt``."""
    path = cache_root(cache_dir) / f"digits-vit-{recipe.digest()}.pt"

    def train() -> dict:
        network, scores = train_digits_vit(recipe)
        return {"state_dict": network.state_dict(), "scores": scores, "recipe": asdict(recipe)}

    entry = cached_training(path, train, retrain)
    with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten; keep the caller's RNG
        network = DigitsViT(recipe)
    network.load_state_dict(entry["state_dict"])
    return DigitsViTEncoder(network.requires_grad_(False), entry["scores"], entry.get("train_seconds"))
