"""``ditlab sample --ckpt PATH --num N --out DIR``: PNGs and an ``.npz`` batch from a run's EMA network.

Labels cycle through the classes (or are fixed with ``--class``); sample ``i`` uses noise seed
``seed + i``, so the same command gives the same images on any machine and batch size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditlab.checkpoint import bundle_from_checkpoint
from ditlab.diffusion.sample import sample_images
from ditlab.methods.accel import cached_model
from ditlab.methods.accel.options import add_cache_arguments, cache_from_args


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> ``(N, H, W, C)`` uint8, the ADM evaluator's layout."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ditlab sample", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a ditlab Lightning checkpoint (.ckpt)")
    parser.add_argument("--num", type=int, default=64, help="number of images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--class", dest="label", type=int, default=None, help="sample only this class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default=None, help="ddpm | ddim | dpm++ (gaussian), euler | heun (flow)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--no-ema", action="store_true", help="sample the raw network instead of its EMA")
    add_cache_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.num < 1:
        raise ValueError(f"--num {args.num}: ask for at least one image")
    bundle = bundle_from_checkpoint(args.ckpt, use_ema=not args.no_ema)
    num_classes = bundle.network.num_classes
    if args.label is not None and not 0 <= args.label < num_classes:
        raise ValueError(f"--class {args.label} is out of range; this model has classes 0..{num_classes - 1}")
    labels = torch.full((args.num,), args.label) if args.label is not None else torch.arange(args.num) % num_classes
    options = {"sampler": args.sampler or bundle.sampling.sampler, "steps": args.steps or bundle.sampling.steps,
               "cfg_scale": bundle.sampling.cfg_scale if args.cfg_scale is None else args.cfg_scale,
               "cfg_channels": bundle.sampling.cfg_channels,
               "batch_size": args.batch_size or bundle.sampling.batch_size}  # fmt: skip
    model = cached_model(bundle.network, cache_from_args(args, bundle.sampling.cache), bundle.objective,
                         options["sampler"], options["steps"], options["cfg_scale"], options["cfg_channels"])  # fmt: skip
    latents = sample_images(model, bundle.objective, labels, seed=args.seed, show_progress=True, **options)
    if model is not bundle.network:
        print(f"cache {model.name}: the last batch computed {model.computed_share:.0%} of the network's block work")
    if bundle.vae:
        from ditlab.data.vae import load_vae

        vae = load_vae(bundle.vae)
        with torch.no_grad():
            latents = torch.cat([vae.decode(chunk / bundle.latent_scale).sample for chunk in latents.split(16)])
    images = to_uint8(latents)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(out / f"{index:06d}.png")
    np.savez(out / "samples.npz", arr_0=images, labels=labels.numpy())
    print(f"wrote {len(images)} images to {out} (and samples.npz)")
    return 0
