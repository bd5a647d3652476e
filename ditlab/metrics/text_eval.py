"""Scoring text-conditioned samples: the prompts they are drawn for and their CLIP score (Hessel et al., 2021,
"CLIPScore") on ditlab's scene CLIP (a CLIP, Radford et al., 2021, trained on the digit scenes).

Shared by the ``Evaluation`` callback and ``ditlab eval`` so both score the same prompts the same way. Prompts are
a captions file (one caption a line, blank lines skipped) or ``validation``: the digit scenes' validation captions,
caption ``i`` for sample ``i``, cycled when there are fewer captions than samples.
"""

from __future__ import annotations

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
