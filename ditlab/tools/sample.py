"""``ditlab sample --ckpt PATH --num N --out DIR``: PNGs and an ``.npz`` batch from a run's EMA network.

Labels cycle through the classes (or are fixed with ``--class``); a text-conditioned run samples ``--prompt "..."``
(every image) or ``--prompts FILE`` (one caption a line, cycled). Sample ``i`` uses noise seed ``seed + i``,
so the same command gives the same images on any machine and batch size. Sampling options (``--steps``,
``--time_grid``, ``--guidance_interval``, ``--cache``, ...) are the run's :class:`SamplingConfig`, overridden.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditlab.diffusion.config import SamplingConfig


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> ``(N, H, W, C)`` uint8, the ADM evaluator's layout."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def describe_sampling(sampling: SamplingConfig, bundle) -> str:
    """``ddim, 20 steps, cfg_scale 2.0 (the checkpoint's; changed: steps)``: what a sampling run uses, in one line."""
    sampler = sampling.sampler or bundle.objective.default_sampler
    steps = "adaptive steps" if sampling.steps is None else f"{sampling.steps} steps"
    parts = [sampler, steps, f"cfg_scale {sampling.cfg_scale:g}"]
    if sampling.cache.policy != "none":
        parts.append(f"cache {sampling.cache.policy}")
    if sampling.time_grid is not None:
        parts.append(f"time_grid {sampling.time_grid}")
    if sampling.guidance_interval is not None:
        parts.append(f"guidance_interval {list(sampling.guidance_interval)}")
    recorded = bundle.sampling
    changed = [item.name for item in fields(SamplingConfig) if item.name != "batch_size"
               and getattr(sampling, item.name) != getattr(recorded, item.name)]  # fmt: skip
    return ", ".join(parts) + (f" (the checkpoint's, except {', '.join(changed)})" if changed else " (the checkpoint's)")


def sample(ckpt: str, out: str, num: int = 64, label: int | None = None, seed: int = 0, ema: bool = True,
           sampling: SamplingConfig | None = None, prompt: str | None = None, prompts: str | None = None) -> int:  # fmt: skip
    """Draw images from a checkpoint: one PNG each and ``samples.npz`` (uint8 NHWC ``arr_0`` and ``labels``, or
    ``captions`` for a text-conditioned run, also written to ``captions.txt``).

    Labels cycle through the classes (or are all ``--class``); sample ``i`` uses noise seed ``seed + i``, so the
    same command gives the same images on any machine and batch size.

    Args:
        ckpt: a ditlab checkpoint (a .ckpt file or a sharded checkpoint folder).
        out: output folder.
        num: number of images.
        label: sample only this class (also spelt ``--class``); default: cycle through the classes.
        seed: noise seed of the first image.
        ema: sample the EMA network; ``--no-ema`` samples the raw network.
        sampling: sampler, steps, guidance, time grid, SDE, tolerances and feature cache (default: the run's).
        prompt: the caption of every image (text-conditioned runs).
        prompts: a text file of captions, one a line, cycled (text-conditioned runs; default: the digit scenes'
            validation captions).
    """
    from ditlab.checkpoint import bundle_from_checkpoint, sample_bundle, sampling_model

    if num < 1:
        raise ValueError(f"--num {num}: ask for at least one image")
    if prompt is not None and prompts is not None:
        raise ValueError("give --prompt or --prompts, not both")
    bundle = bundle_from_checkpoint(ckpt, use_ema=ema)
    text = bundle.network.config.text_conditioned
    if text:
        if label is not None:
            raise ValueError("--class: this run is text-conditioned; give --prompt \"...\" or --prompts FILE")
        from ditlab.metrics.text_eval import caption_prompts

        labels = [prompt] * num if prompt is not None else caption_prompts(prompts or "validation", num)
    else:
        if prompt is not None or prompts is not None:
            raise ValueError("--prompt/--prompts: this run is class-conditional; give --class N (or nothing)")
        num_classes = bundle.network.num_classes
        if label is not None and not 0 <= label < num_classes:
            raise ValueError(f"--class {label} is out of range; this model has classes 0..{num_classes - 1}")
        labels = torch.full((num,), label) if label is not None else torch.arange(num) % num_classes
    sampling = sampling if sampling is not None else bundle.sampling
    print(f"sampling {num} image(s) from {bundle.source}: {describe_sampling(sampling, bundle)}", flush=True)
    model = sampling_model(bundle, sampling)
    images = to_uint8(sample_bundle(bundle, labels, sampling, seed, progress="sampling", model=model))
    share = getattr(model, "computed_share", None) if model is not bundle.network else None
    if share is not None:  # a policy that counts its work
        print(f"cache {getattr(model, 'name', '') or sampling.cache.policy}: the last batch computed {share:.0%} of the network's block work")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(folder / f"{index:06d}.png")
    if text:
        np.savez(folder / "samples.npz", arr_0=images, captions=np.array(labels))
        (folder / "captions.txt").write_text("".join(f"{caption}\n" for caption in labels))
    else:
        np.savez(folder / "samples.npz", arr_0=images, labels=labels.numpy())
    print(f"wrote {len(images)} images to {folder} (and samples.npz)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ditlab sample ARGS`` (what ``ditlab.cli`` runs)."""
    from ditlab.tools.command import run_tool

    return run_tool("sample", list(argv or []))
