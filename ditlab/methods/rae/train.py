"""Training an RAE's ViT decoder on a frozen representation encoder: ``python -m ditlab.methods.rae.train``.

RAE's stage 1 (bytetriper/RAE ``src/train_stage1.py``, ``configs/stage1/training/DINOv2-B_decXL.yaml``): the encoder
stays frozen, the decoder learns to map its tokens back to pixels, and its input is *noise-augmented*: ``z + sigma
eps`` with ``sigma ~ U(0, tau)`` per image (``noise_tau`` 0.8), so it decodes the slightly-off latents a diffusion
model samples. AdamW (betas 0.9, 0.95, no weight decay), linear warm-up then cosine decay to a tenth of the rate.

[interp] The loss is L1 + L2 on pixels: RAE adds LPIPS and a DINO-discriminator GAN loss, which need weights ditlab
does not have offline. The noise is added to the *standardised* latents (the diffusion model's space), where RAE adds
it to the raw tokens of its unit-scale ("wNorm") encoders; for those the two coincide up to the statistics' scale.
The latent statistics (RAE's ``calculate_stat.py``: per-element mean and variance over the batch dimension) are
measured here, before decoder training, on up to ``stats_images`` training images.

``build_rae(recipe)`` trains once per recipe and caches the folder under ``$DITLAB_CACHE/rae-<hash>/`` (as the digits
ViT and the dicomp teacher are), so ``configs/rae.yaml`` runs on a fresh clone with one command.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ditlab.methods.rae.autoencoder import (
    FORMAT,
    RAE,
    DecoderShape,
    build_decoder,
    is_rae_folder,
    load_rae,
    tokens_to_latents,
)
from ditlab.methods.rae.encoders import rae_encoder


@dataclass(frozen=True)
class DecoderRecipe:
    """Everything that fixes an RAE decoder's weights; its hash names the cache folder.

    Args:
        encoder: the frozen representation encoder (``digits-vit``, ``scene-clip``, ``dinov2-vitb14``, ``siglip2``,
            ``mae``, ``dinov2-hf``: :mod:`ditlab.methods.rae.encoders`).
        encoder_options: its keyword options (``grid``, ``weights``, ``repo``, ``path``, ``input_size``).
        source: images, as ``ditlab encode`` reads them: ``digits``, ``scenes[:SPLIT[:COUNT]]`` or an image folder.
        image_size: image side (digits 16, scenes 32).
        decoder: the ViT decoder's width, depth, heads and MLP ratio.
        noise_tau: the noise augmentation's largest sigma (RAE: 0.8; 0 turns it off).
        l1_weight: weight of the L1 pixel loss.
        l2_weight: weight of the L2 pixel loss.
        steps: optimiser steps.
        batch_size: images per step.
        lr: peak learning rate.
        final_lr: learning rate at the end of the cosine decay.
        warmup_steps: linear warm-up from 0.
        betas: AdamW betas.
        weight_decay: AdamW weight decay.
        holdout: images kept out of training for the reconstruction scores.
        stats_images: training images the latent statistics are measured on.
        num_workers: DataLoader workers (not part of the hash: they do not change the weights).
        seed: data order, holdout split, noise and initialisation.
        version: bump to retrain every cached decoder.
    """

    encoder: str = "digits-vit"
    encoder_options: dict = field(default_factory=dict)
    source: str = "digits"
    image_size: int = 16
    decoder: DecoderShape = DecoderShape()
    noise_tau: float = 0.8
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    final_lr: float = 1e-4
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    holdout: int = 200
    stats_images: int = 10000
    num_workers: int = 0
    seed: int = 0
    version: int = 1

    def digest(self) -> str:
        from ditlab.metrics.features import recipe_digest

        return recipe_digest(replace(self, num_workers=0))


class _Rows(Dataset):
    """Images ``source.load(i)`` of chosen rows; an unreadable image is None (dropped by :func:`_stack`)."""

    def __init__(self, source, rows: torch.Tensor) -> None:
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.source.load(int(self.rows[index]))


def _stack(items: list) -> torch.Tensor:
    return torch.stack([item for item in items if item is not None])


def _batches(loader: DataLoader):
    while True:
        yield from loader


@torch.no_grad()
def latent_statistics(encoder, images: DataLoader, grid: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element mean and population variance ``(F, g, g)`` of the raw latents over the images (RAE's stats)."""
    total, count, squares = None, 0, None
    for batch in images:
        latents = tokens_to_latents(encoder.tokens(batch.to(device)), grid).double()
        total = latents.sum(0) if total is None else total + latents.sum(0)
        squares = (latents**2).sum(0) if squares is None else squares + (latents**2).sum(0)
        count += len(latents)
    mean = total / count
    return mean.float().cpu(), (squares / count - mean**2).clamp_min(0).float().cpu()


@torch.no_grad()
def reconstruction_scores(rae: RAE, images: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """L1, MSE and PSNR (images in [-1, 1], peak-to-peak 2) of clean encode -> decode round trips."""
    device = rae.latent_mean.device
    l1 = mse = 0.0
    for chunk in images.split(batch_size):
        chunk = chunk.to(device)
        recon = rae.decode_latents(rae.encode_latents(chunk)).clamp(-1, 1)
        l1 += (recon - chunk).abs().mean(dim=(1, 2, 3)).sum().item()
        mse += ((recon - chunk) ** 2).mean(dim=(1, 2, 3)).sum().item()
    l1, mse = l1 / len(images), mse / len(images)
    return {"l1": l1, "mse": mse, "psnr": 10 * math.log10(4.0 / max(mse, 1e-12))}


def make_spec(recipe: DecoderRecipe, encoder, channels: int) -> dict:
    grid = encoder.grid
    if recipe.image_size % grid:
        raise ValueError(f"image_size {recipe.image_size} is not a multiple of the encoder's {grid}x{grid} token grid")
    return {"format": FORMAT, "encoder": {"name": recipe.encoder, "options": dict(recipe.encoder_options)},
            "encoder_identity": encoder.identity(), "image_size": recipe.image_size, "channels": channels,
            "latent_shape": [encoder.feature_dim, grid, grid], "decoder": asdict(recipe.decoder),
            "noise_tau": recipe.noise_tau, "recipe": {**asdict(recipe), "digest": recipe.digest()}}  # fmt: skip


def train_decoder(recipe: DecoderRecipe = DecoderRecipe(), device: str = "cpu", progress: bool = False
                  ) -> tuple[RAE, dict]:  # fmt: skip
    """Train the decoder of ``recipe``; returns the RAE (on ``device``) and its scores: the mean training loss of
    the first and last 20 steps and the holdout's clean reconstruction L1 / MSE / PSNR."""
    from ditlab.data.latents import open_source
    from ditlab.progress import TaskProgress

    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(recipe.seed)
        generator = torch.Generator().manual_seed(recipe.seed)
        source = open_source(recipe.source, recipe.image_size)
        if recipe.holdout >= len(source):
            raise ValueError(f"holdout={recipe.holdout} leaves no training images of {len(source)}")
        order = torch.randperm(len(source), generator=generator)
        holdout, train = order[: recipe.holdout], order[recipe.holdout :]
        encoder = rae_encoder(recipe.encoder, **recipe.encoder_options).to(device)
        workers = {"num_workers": recipe.num_workers, "collate_fn": _stack}
        stats_rows = _Rows(source, train[: recipe.stats_images])
        mean, var = latent_statistics(encoder, DataLoader(stats_rows, batch_size=256, **workers), encoder.grid, device)
        channels = int(getattr(source, "channels", 3))
        spec = make_spec(recipe, encoder, channels)
        rae = RAE(spec, build_decoder(spec), mean, var, encoder=encoder).to(device)
        decoder = rae.decoder.train()
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=recipe.lr, betas=tuple(recipe.betas),
                                      weight_decay=recipe.weight_decay)  # fmt: skip
        floor = recipe.final_lr / recipe.lr

        def rate(step: int) -> float:
            if step < recipe.warmup_steps:
                return (step + 1) / recipe.warmup_steps
            done = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
        sampler = RandomSampler(_Rows(source, train), generator=generator)
        batches = _batches(DataLoader(_Rows(source, train), batch_size=recipe.batch_size, sampler=sampler,
                                      drop_last=True, **workers))  # fmt: skip
        losses = []
        with TaskProgress("rae decoder", recipe.steps, unit="steps", enabled=progress) as bar:
            for _ in range(recipe.steps):
                images = next(batches).to(device)
                latents = rae.noised(rae.encode_latents(images), recipe.noise_tau)
                recon = rae.decode_latents(latents)
                loss = (recipe.l1_weight * (recon - images).abs().mean()
                        + recipe.l2_weight * ((recon - images) ** 2).mean())  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.detach())
                bar.advance(1)
        rae = rae.requires_grad_(False).eval()
        losses = torch.stack(losses).cpu()
        held = _stack([source.load(int(i)) for i in holdout])
        scores = {"loss_first": losses[:20].mean().item(), "loss_last": losses[-20:].mean().item(),
                  "holdout": reconstruction_scores(rae, held), "holdout_images": len(held)}  # fmt: skip
    rae.spec["scores"] = scores
    return rae, scores


def cache_folder(recipe: DecoderRecipe, cache_dir: str | Path | None = None) -> Path:
    from ditlab.metrics.features import cache_root

    return cache_root(cache_dir) / f"rae-{recipe.encoder}-{recipe.digest()}"


def build_rae(recipe: DecoderRecipe = DecoderRecipe(), out: str | Path | None = None, cache_dir: str | Path | None = None,
              retrain: bool = False, device: str = "auto", progress: bool = True) -> Path:  # fmt: skip
    """The RAE folder of ``recipe``: ``out`` (or the cache folder), trained now unless it already holds one."""
    folder = Path(out).expanduser() if out is not None else cache_folder(recipe, cache_dir)
    if is_rae_folder(folder) and not retrain:
        return folder
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"[rae] training the {recipe.encoder} decoder ({recipe.steps} steps on {device}) into {folder}", flush=True)
    rae, scores = train_decoder(recipe, device, progress)
    rae.save(folder)
    print(f"[rae] {folder}: holdout PSNR {scores['holdout']['psnr']:.2f} dB, L1 {scores['holdout']['l1']:.4f}", flush=True)
    return folder


def fit_decoder(recipe: DecoderRecipe = DecoderRecipe(), out: str | None = None, cache_dir: str | None = None,
                retrain: bool = False, device: str = "auto") -> Path:  # fmt: skip
    """Train an RAE decoder (``--config configs/rae_decoder.yaml``) and write its folder.

    Args:
        recipe: the encoder, data, decoder size and optimisation (``DecoderRecipe``).
        out: the RAE folder to write; null: ``$DITLAB_CACHE/rae-<encoder>-<hash>`` (what ``configs/rae.yaml`` reads).
        cache_dir: the cache root when ``out`` is null.
        retrain: train even when the folder already holds a decoder.
        device: auto | cpu | cuda | cuda:N.
    """
    folder = build_rae(recipe, out, cache_dir, retrain, device)
    print(folder)
    return folder


def recipe_from(value) -> DecoderRecipe:
    """A recipe from a ``DecoderRecipe``, a dict of its fields, or a YAML file with a ``recipe:`` entry."""
    if isinstance(value, DecoderRecipe):
        return value
    if isinstance(value, (str, Path)):
        import yaml

        path = Path(value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"decoder recipe {path} does not exist (e.g. configs/rae_decoder.yaml)")
        value = (yaml.safe_load(path.read_text()) or {}).get("recipe", {})
    values = dict(value)
    if isinstance(values.get("decoder"), dict):
        values["decoder"] = DecoderShape(**values["decoder"])
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return DecoderRecipe(**values)


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import CLI

    CLI(fit_decoder, args=sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["DecoderRecipe", "build_rae", "fit_decoder", "latent_statistics", "load_rae", "reconstruction_scores",
           "recipe_from", "train_decoder"]  # fmt: skip
