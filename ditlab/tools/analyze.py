"""``ditlab analyze --ckpt PATH``: per-block importance of a run's EMA network and the blocks to keep.

Calibration images are the embedded digits (a 1-channel network; any size, resized), noised at
``--num-timesteps`` levels. Writes ``analysis.json`` (per criterion: keep list, scores and details),
``importance.md`` and ``importance.png`` to ``--out`` (default: ``analysis/`` in the run folder).

``--redundancy`` instead samples ``--num-images`` images (default 8) uncached with the run's sampling settings
(or ``--sampler``/``--steps``/``--cfg-scale``) and writes the step-to-step change of every block's cacheable
units, ``redundancy.json`` and the heatmap ``redundancy.png`` (``ditlab.methods.accel.redundancy``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from ditlab.checkpoint import bundle_from_checkpoint
from ditlab.methods.compress.analysis import CRITERIA, importance_table, plot_importance, select_blocks


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ditlab analyze", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a ditlab Lightning checkpoint (.ckpt)")
    parser.add_argument(
        "--criteria", default="laptop,amber,ppcl", help=f"comma-separated, from {','.join(CRITERIA)}"
    )
    parser.add_argument("--keep", type=int, default=None, help="blocks to keep (default: half the depth)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="calibration images from the digits (default 256); with --redundancy, samples (default 8)")  # fmt: skip
    parser.add_argument("--num-timesteps", type=int, default=8, help="timestep bins of the calibration set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--additivity", type=int, default=0, help="LAPTOP additivity check over N random sets"
    )
    parser.add_argument("--out", default=None, help="output folder")
    parser.add_argument("--no-ema", action="store_true", help="analyse the raw network instead of its EMA")
    parser.add_argument("--redundancy", action="store_true",
                        help="measure step-to-step feature change per block (which units a cache can reuse when)")  # fmt: skip
    parser.add_argument("--sampler", default=None, help="--redundancy: sampler (default: the run's)")
    parser.add_argument("--steps", type=int, default=None, help="--redundancy: sampling steps (default: the run's)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="--redundancy: guidance (default: the run's)")
    return parser.parse_args(argv)


def json_safe(value):
    """Tensors and arrays to lists, tuples to lists, non-finite floats to None, keys to strings."""
    if isinstance(value, torch.Tensor | np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def calibration_images(network, num_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_images`` seeded digits ``(B, 1, S, S)`` and labels, or a one-line error for other networks."""
    if network.in_channels != 1 or network.num_classes < 10:
        shape = f"{network.in_channels} channels and {network.num_classes} classes"
        raise ValueError(
            f"ditlab analyze calibrates on the digits, but this network takes {shape}; a datamodule is "
            "needed: call ditlab.methods.compress.analysis.select_blocks with its images"
        )
    from ditlab.data.digits import digits_tensors

    images, labels = digits_tensors(image_size=network.input_size)
    if not 1 <= num_images <= len(labels):
        raise ValueError(
            f"cannot calibrate on {num_images} images (--num-images); the digits have 1..{len(labels)}"
        )
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:num_images]
    return images[order], labels[order]


def output_folder(args: argparse.Namespace) -> Path:
    ckpt = Path(args.ckpt)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return Path(args.out) if args.out else run_dir / "analysis"


def redundancy(args: argparse.Namespace) -> int:
    """``--redundancy``: the DiTCacheAnalysis-style profile, as JSON and a heatmap."""
    from ditlab.methods.accel.redundancy import plot_redundancy, redundancy_profile

    bundle = bundle_from_checkpoint(args.ckpt, use_ema=not args.no_ema)
    steps = args.steps or bundle.sampling.steps
    if steps < 2:
        raise ValueError(f"--steps {steps}: the redundancy probe compares consecutive steps; use 2 or more")
    cfg_scale = bundle.sampling.cfg_scale if args.cfg_scale is None else args.cfg_scale
    profile = redundancy_profile(bundle.network, bundle.objective, args.sampler or bundle.sampling.sampler, steps,
                                 cfg_scale, args.num_images or 8, args.seed)  # fmt: skip
    out = output_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "redundancy.json").write_text(json.dumps(json_safe({"checkpoint": str(args.ckpt), **profile}), indent=1))
    plot_redundancy(profile, out / "redundancy.png")
    for unit, branches in profile["units"].items():
        relative = branches[profile["branches"][0]]["relative"]
        table = np.asarray(relative["mean"])
        print(f"{unit:<10} relative change {profile['branches'][0]}: median {np.median(table):.3f}, "
              f"CoV across samples {relative['cov']:.3f}")  # fmt: skip
    print(f"wrote {out / 'redundancy.json'} and redundancy.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.redundancy:
        return redundancy(args)
    args.num_images = 256 if args.num_images is None else args.num_images
    criteria = list(dict.fromkeys(name.strip() for name in args.criteria.split(",") if name.strip()))
    unknown = [name for name in criteria if name not in CRITERIA]
    if unknown or not criteria:
        raise ValueError(
            f"unknown criteria {unknown} in --criteria {args.criteria!r}; choices: {list(CRITERIA)}"
        )
    bundle = bundle_from_checkpoint(args.ckpt, use_ema=not args.no_ema)
    network, depth = bundle.network, bundle.network.depth
    num_keep = depth // 2 if args.keep is None else args.keep
    if not 1 <= num_keep <= depth:
        raise ValueError(
            f"cannot keep {num_keep} blocks of a network of depth {depth} (--keep); choose 1..{depth}"
        )
    images, labels = calibration_images(network, args.num_images, args.seed)
    ckpt = Path(args.ckpt)
    out = output_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    selections = []
    with Progress(transient=True) as progress:
        task = progress.add_task("block importance", total=len(criteria))
        for name in criteria:
            progress.update(task, description=f"block importance: {name}")
            options = {"additivity_sets": args.additivity} if name == "laptop" and args.additivity else {}
            options.update(seed=args.seed, num_timesteps=args.num_timesteps)
            selections.append(
                select_blocks(network, bundle.objective, images, labels, name, num_keep, **options)
            )
            progress.advance(task)
    report = {"checkpoint": str(ckpt), "depth": depth, "num_keep": num_keep, "num_images": len(labels),
              "num_timesteps": args.num_timesteps, "seed": args.seed, "objective": bundle.objective.kind,
              "criteria": {s.criterion: {"keep": s.keep, "scores": s.scores, "table": s.table}
                           for s in selections}}  # fmt: skip
    (out / "analysis.json").write_text(json.dumps(json_safe(report), indent=1))
    table = importance_table(selections)
    (out / "importance.md").write_text(
        f"# Block importance: {ckpt.name}, keep {num_keep} of {depth}\n\n{table}"
    )
    plot_importance(selections, out / "importance.png")
    print(table, end="")
    print(f"wrote {out / 'analysis.json'}, importance.md and importance.png")
    return 0
