"""Scoring text-conditioned samples: the prompts they are drawn for, their CLIP score (Hessel et al., 2021,
"CLIPScore") on ditlab's scene CLIP (a CLIP, Radford et al., 2021, trained on the digit scenes) and their
compositional accuracy (GenEval's per-object checks, Ghosh et al., 2023, with ditlab's scene recognizer).

Shared by the ``Evaluation`` callback and ``ditlab eval`` so both score the same prompts the same way. Prompts are
a captions file (one caption a line, blank lines skipped) or ``validation``: the digit scenes' validation captions,
caption ``i`` for sample ``i``, cycled when there are fewer captions than samples. Compositional accuracy reads
what each prompt asks for from its text, so it is scored only when every prompt is in the scenes' caption grammar
(always so for ``validation``). Under ``torch.distributed`` both metrics reduce summed states, so every process
gets the score of all processes' samples, equal to one process scoring them all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from ditlab.metrics.clip_score import CLIPScore


def is_text_conditioned(module) -> bool:
    """Whether a module samples from captions (it says so with ``text_conditioned = True``)."""
    return bool(getattr(module, "text_conditioned", False))


def caption_prompts(source: str, count: int) -> list[str]:
    """``count`` prompts from ``source`` (``validation`` or a captions file), cycled."""
    if source == "validation":
        from ditlab.data.scenes import DigitScenes

        captions = DigitScenes("validation").captions(range(min(count, len(DigitScenes("validation")))))
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"captions file {path} does not exist; give a text file with one caption a line "
                                    "or 'validation' (the digit scenes' validation captions)")  # fmt: skip
        captions = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not captions:
            raise ValueError(f"captions file {path} holds no captions; write one caption a line")
    return [captions[i % len(captions)] for i in range(count)]


def sample_conditions(config, count: int, captions: str = "validation"):
    """The condition of samples ``0 .. count-1`` for calibration, reports and benchmarks: class labels
    ``arange(count) % num_classes``, or for a text-conditioned network caption ``i`` of ``captions`` (a file, one a
    line, or ``validation``: the digit scenes' validation captions), cycled."""
    if getattr(config, "text_conditioned", False):
        return caption_prompts(captions, count)
    return torch.arange(count) % config.num_classes


@lru_cache(maxsize=2)
def _scene_clip(cache_dir: str | None):
    from ditlab.metrics.scene_clip import scene_clip

    return scene_clip(cache_dir)


@torch.no_grad()
def clip_score_of(images: torch.Tensor | None, captions: list[str], device: torch.device | str = "cpu",
                  cache_dir: str | None = None, batch_size: int = 256) -> dict:  # fmt: skip
    """``{"clip_score", "clip_features"}`` of ``images (N, 3, H, W)`` in [-1, 1] against ``captions``.

    Under ``torch.distributed`` every process calls this with its own share (``images=None`` and no captions for
    a process without samples) and all get the score of the union.
    """
    count = 0 if images is None else len(images)
    if count != len(captions):
        raise ValueError(f"{count} images but {len(captions)} captions; give one caption per image")
    model = _scene_clip(cache_dir).to(device)
    metric = CLIPScore().to(device)
    for start in range(0, count, batch_size):
        chunk = images[start : start + batch_size].to(device, torch.float32)
        metric.update(model.encode_images(chunk), model.encode_captions(list(captions[start : start + batch_size])))
    return {"clip_score": float(metric.compute()), "clip_features": "scene-clip"}


def compositional_prompts(captions: Sequence[str]) -> bool:
    """Whether every caption is in the digit scenes' caption grammar (so compositional accuracy can read it)."""
    from ditlab.data.scene_grammar import parse_caption

    try:
        for caption in captions:
            parse_caption(caption)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=2)
def _scene_recognizer(cache_dir: str | None):
    from ditlab.metrics.scene_recognizer import scene_recognizer

    return scene_recognizer(cache_dir)


@torch.no_grad()
def compositional_of(images: torch.Tensor | None, captions: list[str], device: torch.device | str = "cpu",
                     cache_dir: str | None = None, batch_size: int = 256) -> dict:  # fmt: skip
    """``compositional_accuracy`` (GenEval's whole-prompt rate) and the per-check rates ``compositional_digit``,
    ``_colour``, ``_size``, ``_count``, ``_position`` of ``images (N, 3, H, W)`` in [-1, 1] against ``captions``
    (``ditlab.metrics.compositional``; a check no prompt asks for, e.g. position without relations, is left out).

    Under ``torch.distributed`` every process calls this with its own share (``images=None`` and no captions for
    a process without samples) and all get the rates of the union.
    """
    from ditlab.metrics.compositional import CompositionalAccuracy

    count = 0 if images is None else len(images)
    if count != len(captions):
        raise ValueError(f"{count} images but {len(captions)} captions; give one caption per image")
    metric = CompositionalAccuracy(_scene_recognizer(cache_dir)).to(device)
    for start in range(0, count, batch_size):
        metric.update(images[start : start + batch_size].to(device, torch.float32),
                      list(captions[start : start + batch_size]))  # fmt: skip
    rates = metric.compute()
    named = {"compositional_accuracy" if key == "whole" else f"compositional_{key}": value
             for key, value in rates.items() if key != "num_prompts" and not math.isnan(value)}  # fmt: skip
    return named
