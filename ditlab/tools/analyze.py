"""``ditlab analyze --ckpt PATH``: per-block importance of a run's EMA network and the blocks to keep.

Calibration images are the embedded digits (a 1-channel network; any size, resized), or the digit scenes with
their captions for a text-conditioned network, noised at ``--num-timesteps`` levels. Writes ``analysis.json`` (per criterion: keep list, scores and details),
``importance.md`` and ``importance.png`` to ``--out`` (default: ``analysis/`` in the run folder).

``--redundancy`` instead samples ``--num-images`` images (default 8) uncached with the run's sampling settings
(or ``--sampler``/``--steps``/``--cfg_scale``) and writes the step-to-step change of every block's cacheable
units, ``redundancy.json`` and the heatmap ``redundancy.png`` (``ditlab.methods.sampling.caches.redundancy``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ditlab.checkpoint import bundle_from_checkpoint
from ditlab.diffusion.config import SamplingConfig
from ditlab.methods.compress.analysis import CRITERIA, importance_table, plot_importance, select_blocks
from ditlab.progress import TaskProgress


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


def scene_calibration(network, num_images: int, seed: int):
    """``num_images`` seeded digit scenes ``(B, 3, S, S)`` and their captions encoded by the network's text encoder."""
    from ditlab.data.scenes import DigitScenes
    from ditlab.models.text.prompts import encode_prompts

    if network.in_channels != 3:
        raise ValueError(f"ditlab analyze calibrates text-conditioned networks on the digit scenes (RGB), but this "
                         f"network takes {network.in_channels} channels; call "
                         "ditlab.methods.compress.analysis.select_blocks with its images")  # fmt: skip
    scenes = DigitScenes("train")
    if not 1 <= num_images <= len(scenes):
        raise ValueError(f"cannot calibrate on {num_images} images (--num-images); the scenes have 1..{len(scenes)}")
    order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(seed))[:num_images].tolist()
    images = torch.nn.functional.interpolate(scenes.images(order), size=network.input_size, mode="bilinear",
                                             antialias=True, align_corners=False)  # fmt: skip
    return images, encode_prompts(network.config, scenes.captions(order))


def calibration_images(network, num_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_images`` seeded digits ``(B, 1, S, S)`` and labels (digit scenes and encoded captions for a
    text-conditioned network), or a one-line error for other networks."""
    if network.config.text_conditioned:
        return scene_calibration(network, num_images, seed)
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


def output_folder(ckpt: str, out: str | None) -> Path:
    path = Path(ckpt)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return Path(out) if out else run_dir / "analysis"


def redundancy_report(ckpt: str, num_images: int, seed: int, ema: bool, out: str | None,
               sampling: SamplingConfig | None) -> int:  # fmt: skip
    """``--redundancy``: the DiTCacheAnalysis-style profile, as JSON and a heatmap."""
    from ditlab.methods.sampling.caches.redundancy import plot_redundancy, redundancy_profile

    bundle = bundle_from_checkpoint(ckpt, use_ema=ema)
    sampling = sampling if sampling is not None else bundle.sampling
    steps = sampling.steps
    if steps is None or steps < 2:
        raise ValueError(f"--steps {steps}: the redundancy probe compares consecutive steps; use 2 or more")
    profile = redundancy_profile(bundle.network, bundle.objective, sampling.sampler, steps, sampling.cfg_scale,
                                 num_images, seed)  # fmt: skip
    folder = output_folder(ckpt, out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "redundancy.json").write_text(json.dumps(json_safe({"checkpoint": str(ckpt), **profile}), indent=1))
    plot_redundancy(profile, folder / "redundancy.png")
    for unit, branches in profile["units"].items():
        relative = branches[profile["branches"][0]]["relative"]
        table = np.asarray(relative["mean"])
        print(f"{unit:<10} relative change {profile['branches'][0]}: median {np.median(table):.3f}, "
              f"CoV across samples {relative['cov']:.3f}")  # fmt: skip
    print(f"wrote {folder / 'redundancy.json'} and redundancy.png")
    return 0


def analyze(ckpt: str, criteria: str = "laptop,amber,ppcl", keep: int | None = None, num_images: int | None = None,
            num_timesteps: int = 8, seed: int = 0, additivity: int = 0, out: str | None = None, ema: bool = True,
            redundancy: bool = False, sampling: SamplingConfig | None = None) -> int:  # fmt: skip
    """Rank a trained network's blocks by importance (which to keep when pruning), or profile feature redundancy.

    Calibration images are the embedded digits (a 1-channel network; any size, resized), or the digit scenes with
    their captions (a text-conditioned network), noised at ``num_timesteps`` levels. Writes ``analysis.json``, ``importance.md`` and ``importance.png``; with
    ``--redundancy``, samples uncached and writes ``redundancy.json`` and ``redundancy.png`` instead.

    Args:
        ckpt: a ditlab checkpoint (a .ckpt file or a sharded checkpoint folder).
        criteria: comma-separated, from random, first, last, ppcl, laptop, amber, tinyfusion.
        keep: blocks to keep (default: half the depth).
        num_images: calibration images (digits or scenes, default 256); with ``--redundancy``, samples (default 8).
        num_timesteps: timestep bins of the calibration set.
        seed: seed of the calibration subset and noise.
        additivity: LAPTOP additivity check over this many random block sets (0: none).
        out: output folder (default: ``analysis/`` in the run folder).
        ema: analyse the EMA network; ``--no-ema`` analyses the raw network.
        redundancy: measure each block's step-to-step feature change (which units a cache can reuse, when).
        sampling: ``--redundancy`` only: the sampler, steps and guidance to sample with (default: the run's).
    """
    if redundancy:
        return redundancy_report(ckpt, 8 if num_images is None else num_images, seed, ema, out, sampling)
    num_images = 256 if num_images is None else num_images
    names = list(dict.fromkeys(name.strip() for name in criteria.split(",") if name.strip()))
    unknown = [name for name in names if name not in CRITERIA]
    if unknown or not names:
        raise ValueError(f"unknown criteria {unknown} in --criteria {criteria!r}; choices: {list(CRITERIA)}")
    bundle = bundle_from_checkpoint(ckpt, use_ema=ema)
    network, depth = bundle.network, bundle.network.depth
    num_keep = depth // 2 if keep is None else keep
    if not 1 <= num_keep <= depth:
        raise ValueError(f"cannot keep {num_keep} blocks of a network of depth {depth} (--keep); choose 1..{depth}")
    images, labels = calibration_images(network, num_images, seed)
    folder = output_folder(ckpt, out)
    folder.mkdir(parents=True, exist_ok=True)
    selections = []
    with TaskProgress("block importance", len(names), unit="criteria") as bar:
        for name in names:
            options = {"additivity_sets": additivity} if name == "laptop" and additivity else {}
            options.update(seed=seed, num_timesteps=num_timesteps)
            selections.append(select_blocks(network, bundle.objective, images, labels, name, num_keep, **options))
            bar.advance()
    report = {"checkpoint": str(ckpt), "depth": depth, "num_keep": num_keep, "num_images": len(labels),
              "num_timesteps": num_timesteps, "seed": seed, "objective": bundle.objective.kind,
              "criteria": {s.criterion: {"keep": s.keep, "scores": s.scores, "table": s.table}
                           for s in selections}}  # fmt: skip
    (folder / "analysis.json").write_text(json.dumps(json_safe(report), indent=1))
    table = importance_table(selections)
    title = f"# Block importance: {Path(ckpt).name}, keep {num_keep} of {depth}"
    (folder / "importance.md").write_text(f"{title}\n\n{table}")
    plot_importance(selections, folder / "importance.png")
    print(table, end="")
    print(f"wrote {folder / 'analysis.json'}, importance.md and importance.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ditlab analyze ARGS`` (what ``ditlab.cli`` runs)."""
    from ditlab.tools.command import run_tool

    return run_tool("analyze", list(argv or []))
