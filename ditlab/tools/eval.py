"""``ditlab eval --ckpt PATH [--num 1000] [--ref digits|PATH.npz] [--features digits-classifier|inception-v3]``.

Samples a run's EMA network with class-balanced labels (sample ``i`` from seed ``seed + i``), then prints
FID (Heusel et al.), IS (Salimans et al.) and precision/recall (Kynkaanniemi et al.) and writes
``metrics.json`` (numbers plus the protocol that produced them) and ``samples.npz`` (uint8 NHWC ``arr_0``,
the ADM evaluator's format) to ``--out``. Metrics are computed from the uint8 images in ``samples.npz``, so
any other evaluator run on that file sees exactly what ditlab measured. ``--samples PATH.npz`` evaluates an
existing batch instead of sampling.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ditlab.checkpoint import bundle_from_checkpoint
from ditlab.diffusion.sample import sample_images
from ditlab.methods.accel import cached_model
from ditlab.methods.accel.options import add_cache_arguments, cache_from_args
from ditlab.metrics.features import feature_extractor
from ditlab.metrics.fid import evaluate_images
from ditlab.metrics.reference import images_from_uint8
from ditlab.tools.sample import to_uint8


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ditlab eval", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a ditlab Lightning checkpoint (.ckpt) to sample")
    source.add_argument("--samples", help="an existing batch (.npz with uint8 NHWC arr_0) to evaluate")
    parser.add_argument("--num", type=int, default=1000, help="number of images to sample")
    parser.add_argument(
        "--ref", default="digits", help="digits | PATH.npz (ADM reference batch) | cleanfid:NAME"
    )
    parser.add_argument("--features", default="digits-classifier", help="digits-classifier | inception-v3")
    parser.add_argument("--inception-weights", default=None,
                        help="local weights-inception-2015-12-05-6726825d.pth (or set DITLAB_INCEPTION_WEIGHTS)")  # fmt: skip
    parser.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default=None, help="ddpm | ddim | dpm++ (gaussian), euler | heun (flow)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--no-ema", action="store_true", help="sample the raw network instead of its EMA")
    add_cache_arguments(parser)
    return parser.parse_args(argv)


def sample_checkpoint(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(images uint8 NHWC, labels, protocol)`` sampled from ``args.ckpt`` with a progress bar."""
    bundle = bundle_from_checkpoint(args.ckpt, use_ema=not args.no_ema)
    labels = torch.arange(args.num) % bundle.network.num_classes
    options = {"sampler": args.sampler or bundle.sampling.sampler, "steps": args.steps or bundle.sampling.steps,
               "cfg_scale": bundle.sampling.cfg_scale if args.cfg_scale is None else args.cfg_scale,
               "cfg_channels": bundle.sampling.cfg_channels,
               "batch_size": args.batch_size or bundle.sampling.batch_size}  # fmt: skip
    cache = cache_from_args(args, bundle.sampling.cache)
    model = cached_model(bundle.network, cache, bundle.objective, options["sampler"], options["steps"],
                         options["cfg_scale"], options["cfg_channels"])  # fmt: skip
    images = sample_images(model, bundle.objective, labels, seed=args.seed, show_progress=True, **options)
    if bundle.vae:
        from ditlab.data.vae import load_vae

        vae = load_vae(bundle.vae)
        with torch.no_grad():
            images = torch.cat([vae.decode(chunk / bundle.latent_scale).sample for chunk in images.split(16)])
    protocol = {"checkpoint": str(args.ckpt), "ema": not args.no_ema, "seed": args.seed,
                "labels": "arange(num) % num_classes", **{k: v for k, v in options.items() if k != "batch_size"},
                "cache": {k: v for k, v in asdict(cache).items() if v is not None}}  # fmt: skip
    return to_uint8(images), labels.numpy(), protocol


def read_samples(path: Path) -> np.ndarray:
    """``arr_0`` (uint8 NHWC) of a batch written by ``ditlab sample``/``ditlab eval`` or ADM tooling."""
    with np.load(path) as batch:
        if "arr_0" not in batch.files:
            raise ValueError(f"samples batch {path} has no arr_0 (uint8 NHWC images); keys: {batch.files}")
        return batch["arr_0"]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    source = Path(args.ckpt or args.samples)
    if not source.is_file():
        if args.ckpt:
            raise FileNotFoundError(
                f"checkpoint {source} does not exist; pass a .ckpt file (runs/<name>/version_N/checkpoints/)"
            )
        raise FileNotFoundError(
            f"samples batch {source} does not exist; pass an .npz with uint8 NHWC arr_0 images"
        )
    if args.ckpt and args.num < 4:
        raise ValueError(f"--num {args.num}: metrics need at least 4 images (1000+ for a meaningful FID)")
    started = time.perf_counter()
    options = {"weights": args.inception_weights} if args.features == "inception-v3" else {}
    extractor = feature_extractor(args.features, **options)  # fails fast (missing weights) before sampling
    if args.ckpt:
        images, labels, protocol = sample_checkpoint(args)
        out = Path(args.out) if args.out else source.resolve().parent.parent / "eval"
    else:
        images, protocol = read_samples(source), {"samples": str(source)}
        out = Path(args.out) if args.out else source.parent
    metrics = evaluate_images(images_from_uint8(images), reference=args.ref, extractor=extractor)
    out.mkdir(parents=True, exist_ok=True)
    if args.ckpt:
        np.savez(out / "samples.npz", arr_0=images, labels=labels)
    report = {**metrics, "protocol": {**protocol, "num_samples": len(images), "reference": args.ref},
              "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    width = max(len(key) for key in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"wrote {out / 'metrics.json'}" + (f" and {out / 'samples.npz'}" if args.ckpt else ""))
    return 0
