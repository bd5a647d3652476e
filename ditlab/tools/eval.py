"""``ditlab eval --ckpt PATH [--num 1000] [--ref digits|PATH.npz] [--features digits-classifier|inception-v3]``.

Samples a run's EMA network with class-balanced labels (sample ``i`` from seed ``seed + i``), then prints
FID (Heusel et al.), IS (Salimans et al.) and precision/recall (Kynkaanniemi et al.) and writes
``metrics.json`` (numbers plus the protocol that produced them) and ``samples.npz`` (uint8 NHWC ``arr_0``,
the ADM evaluator's format) to ``--out``. Metrics are computed from the uint8 images in ``samples.npz``, so
any other evaluator run on that file sees exactly what ditlab measured. ``--samples PATH.npz`` evaluates an
existing batch instead of sampling.

Text-conditioned checkpoints are sampled from captions (``--captions FILE``, one a line, or the digit scenes'
``validation`` captions, the default) and also report CLIP score (Hessel et al., 2021) on ditlab's scene CLIP and,
for captions in the digit scenes' grammar, compositional accuracy (after GenEval, Ghosh et al., 2023);
``--samples PATH.npz --captions FILE`` scores an existing batch against its captions the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ditlab.diffusion.config import SamplingConfig


def sample_checkpoint(ckpt: str, num: int, seed: int, ema: bool, sampling: SamplingConfig | None,
                      captions: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:  # fmt: skip
    """``(images uint8 NHWC, labels or captions, protocol)`` sampled from ``ckpt`` with progress."""
    from ditlab.analysis import sample_bundle
    from ditlab.checkpoint import bundle_from_checkpoint
    from ditlab.metrics.text_eval import caption_prompts, is_text_conditioned
    from ditlab.tools.sample import to_uint8

    bundle = bundle_from_checkpoint(ckpt, use_ema=ema)
    sampling = sampling if sampling is not None else bundle.sampling
    if is_text_conditioned(bundle) or is_text_conditioned(bundle.network):
        prompts = caption_prompts(captions or "validation", num)
        images = sample_bundle(bundle, prompts, sampling, seed, progress="sampling")
        labels, described = np.array(prompts), f"captions {captions or 'validation'!r}, sample i gets caption i"
    else:
        labels = torch.arange(num) % bundle.network.num_classes
        images = sample_bundle(bundle, labels, sampling, seed, progress="sampling")
        labels, described = labels.numpy(), "arange(num) % num_classes"
    recorded = {key: value for key, value in asdict(sampling).items() if key != "batch_size"}
    protocol = {"checkpoint": str(ckpt), "ema": ema, "seed": seed, "labels": described}
    protocol.update(recorded)
    return to_uint8(images), labels, protocol


def read_samples(path: Path) -> np.ndarray:
    """``arr_0`` (uint8 NHWC) of a batch written by ``ditlab sample``/``ditlab eval`` or ADM tooling."""
    with np.load(path) as batch:
        if "arr_0" not in batch.files:
            raise ValueError(f"samples batch {path} has no arr_0 (uint8 NHWC images); keys: {batch.files}")
        return batch["arr_0"]


def evaluate(ckpt: str | None = None, samples: str | None = None, num: int = 1000, ref: str = "digits",
             features: str = "digits-classifier", inception_weights: str | None = None, out: str | None = None,
             seed: int = 0, ema: bool = True, sampling: SamplingConfig | None = None,
             captions: str | None = None) -> int:  # fmt: skip
    """Score a checkpoint's samples (or an existing batch): FID, IS, precision and recall, into metrics.json.

    Samples ``num`` images with labels ``arange(num) % num_classes`` (sample ``i`` from seed ``seed + i``), writes
    them as ``samples.npz`` (uint8 NHWC, the ADM evaluator's format) and scores exactly those uint8 images.

    Args:
        ckpt: a ditlab checkpoint to sample (give this or ``--samples``).
        samples: an existing batch (.npz with uint8 NHWC ``arr_0``) to score instead of sampling.
        num: number of images to sample (1000+ for a meaningful FID; papers use 50000).
        ref: reference statistics: ``digits``, ``scenes``, an ADM reference batch ``PATH.npz`` or ``cleanfid:NAME``.
        features: ``digits-classifier``, ``inception-v3`` or ``scene-clip`` (digit scenes: with ``--ref scenes``).
        inception_weights: local ``weights-inception-2015-12-05-6726825d.pth`` (or set DITLAB_INCEPTION_WEIGHTS).
        out: output folder (default: ``eval/`` in the run folder, or the batch's folder).
        seed: noise seed of the first image.
        ema: sample the EMA network; ``--no-ema`` samples the raw network.
        sampling: sampler, steps, guidance, time grid, SDE, tolerances and feature cache (default: the run's).
        captions: prompts of a text-conditioned checkpoint (default ``validation``: the digit scenes' validation
            captions) or the captions of ``--samples``' images, one a line (``validation``: scene ``i``'s for image
            ``i``); with captions, CLIP score on ditlab's scene CLIP is reported too, and compositional accuracy
            (ditlab's scene recognizer) when every caption is in the digit scenes' grammar.
    """
    from ditlab.metrics.features import feature_extractor
    from ditlab.metrics.fid import compute_metrics
    from ditlab.metrics.reference import images_from_uint8, reference_stats
    from ditlab.metrics.text_eval import (
        caption_prompts,
        clip_score_of,
        compositional_of,
        compositional_prompts,
    )

    if (ckpt is None) == (samples is None):
        raise ValueError("give one of --ckpt CKPT (sample and score it) or --samples PATH.npz (score that batch)")
    source = Path(ckpt or samples)
    if not source.exists():
        if ckpt:
            raise FileNotFoundError(
                f"checkpoint {source} does not exist; pass a .ckpt file (runs/<name>/version_N/checkpoints/)"
            )
        raise FileNotFoundError(f"samples batch {source} does not exist; pass an .npz with uint8 NHWC arr_0 images")
    if ckpt and num < 4:
        raise ValueError(f"--num {num}: metrics need at least 4 images (1000+ for a meaningful FID)")
    started = time.perf_counter()
    options = {"weights": inception_weights} if features == "inception-v3" else {}
    extractor = feature_extractor(features, **options)  # fails fast (missing weights) before sampling
    if ckpt:
        images, labels, protocol = sample_checkpoint(ckpt, num, seed, ema, sampling, captions)
        folder = Path(out) if out else source.resolve().parent.parent / "eval"
    else:
        images, protocol = read_samples(source), {"samples": str(source)}
        folder = Path(out) if out else source.parent
    pixels = images_from_uint8(images)
    stats = reference_stats(ref, extractor, image_size=pixels.shape[-1], progress=True)
    generated, logits = extractor.features_and_logits(pixels, progress=f"{extractor.name} features")
    metrics = compute_metrics(generated, logits, stats, extractor.name)
    prompts = labels.tolist() if ckpt and labels.dtype.kind == "U" else None
    if prompts is None and captions is not None and not ckpt:
        prompts = caption_prompts(captions, len(pixels))
        protocol["captions"] = captions
    if prompts is not None:
        if pixels.shape[1] != 3:
            raise ValueError(f"CLIP score on the scene CLIP needs RGB images; the batch has {pixels.shape[1]} channels")
        metrics.update(clip_score_of(pixels, prompts))
        if compositional_prompts(prompts):
            metrics.update(compositional_of(pixels, prompts))
    folder.mkdir(parents=True, exist_ok=True)
    if ckpt:
        np.savez(folder / "samples.npz", arr_0=images, labels=labels)
    report = {**metrics, "protocol": {**protocol, "num_samples": len(images), "reference": ref},
              "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(report, indent=2))
    width = max(len(key) for key in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    print(f"wrote {folder / 'metrics.json'}" + (f" and {folder / 'samples.npz'}" if ckpt else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ditlab eval ARGS`` (what ``ditlab.cli`` runs)."""
    from ditlab.tools.command import run_tool

    return run_tool("eval", list(argv or []))
