"""Compositional accuracy on digit scenes, after GenEval (Ghosh et al., 2023, "GenEval: An Object-Focused Framework
for Evaluating Text-to-Image Alignment"): does a generated image hold what its prompt asks for?

The scene recognizer (``ditlab.metrics.scene_recognizer``) lists the digits it finds in an image; the requested
digits are matched one-to-one to them (Hungarian assignment, ``scipy.optimize.linear_sum_assignment``, preferring
the right digit, then the right colour, then the right size). Per prompt it checks, as GenEval does:

- ``digit``: each requested digit has a match of that digit (a fraction of requested digits);
- ``colour``: ... and that match has the requested colour (GenEval's colour check, on the right object);
- ``count``: the image holds exactly as many digits as the prompt names (a fraction of prompts);
- ``position``: for two-digit prompts, both digits are found and their centres stand in the requested relation
  (dominant axis, ``ditlab.data.scene_grammar.relation_of``; a fraction of prompts with a relation);
- ``whole``: all of the above for the prompt (a fraction of prompts; GenEval's headline number).

``size`` (the matched digit's size is the requested one) is reported too but is not part of ``whole``, as GenEval
checks no sizes. Counts are summed states, so under DDP each process scores its shard and ``compute`` sums them
(torchmetrics, ``dist_reduce_fx="sum"``): two processes give exactly one process's numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric

from ditlab.data.scene_grammar import SceneAttributes, parse_caption, relation_of
from ditlab.metrics.scene_recognizer import Detection, SceneRecognizer, scene_recognizer

COUNTS = ("objects", "digit", "colour", "size", "prompts", "count", "relations", "position", "whole")
RATES = {"digit": "objects", "colour": "objects", "size": "objects", "count": "prompts", "position": "relations",
         "whole": "prompts"}  # fmt: skip


def as_attributes(prompts: Sequence[SceneAttributes | str]) -> list[SceneAttributes]:
    """Requested attributes from attributes or captions (parsed with the scenes grammar)."""
    return [parse_caption(p) if isinstance(p, str) else p for p in prompts]


def score_prompt(found: list[Detection], asked: SceneAttributes) -> dict[str, int]:
    """The checks of one image against one prompt, as counts (see the module docstring)."""
    n = asked.count
    score = dict.fromkeys(COUNTS, 0)
    score.update(objects=n, prompts=1, count=int(len(found) == n), relations=int(asked.relation is not None))
    matched: list[Detection | None] = [None] * n
    if found:
        gain = np.array([[4.0 * (d.digit == digit) + 2.0 * (d.colour == colour) + (d.size == size) for d in found]
                         for digit, colour, size in zip(asked.digits, asked.colours, asked.sizes)])  # fmt: skip
        for row, col in zip(*linear_sum_assignment(gain, maximize=True)):
            matched[row] = found[col]
    right_digit = [m is not None and m.digit == d for m, d in zip(matched, asked.digits)]
    right_colour = [ok and m.colour == c for ok, m, c in zip(right_digit, matched, asked.colours)]
    score["digit"], score["colour"] = sum(right_digit), sum(right_colour)
    score["size"] = sum(ok and m.size == s for ok, m, s in zip(right_digit, matched, asked.sizes))
    if asked.relation is not None:
        score["position"] = int(right_digit[0] and right_digit[1]
                                and relation_of(matched[0].position, matched[1].position) == asked.relation)  # fmt: skip
    score["whole"] = int(all(right_colour) and score["count"] == 1 and (asked.relation is None or score["position"] == 1))
    return score


def score_detections(found: Sequence[list[Detection]], prompts: Sequence[SceneAttributes | str]) -> dict[str, float]:
    """Rates (``digit``, ``colour``, ``size``, ``count``, ``position``, ``whole``) of detections against prompts."""
    totals = dict.fromkeys(COUNTS, 0)
    for detections, asked in zip(found, as_attributes(prompts), strict=True):
        for key, value in score_prompt(detections, asked).items():
            totals[key] += value
    return rates(totals)


def rates(totals: dict[str, float]) -> dict[str, float]:
    """Summed counts -> rates (NaN where nothing was asked, e.g. no prompt with a relation) plus the prompt count."""
    result = {key: float(totals[key]) / float(totals[base]) if totals[base] else float("nan")
              for key, base in RATES.items()}  # fmt: skip
    return {**result, "num_prompts": int(totals["prompts"])}


class CompositionalAccuracy(Metric):
    """``update(images, prompts)`` with prompts as :class:`SceneAttributes` or captions; ``compute()`` -> rates.

    Images ``(N, 3, H, W)`` in [-1, 1] (32x32 or 64x64 scenes). The recognizer defaults to the cached
    ``scene_recognizer()``; it moves with the metric (``.to(device)``) and is never trained here.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, recognizer: SceneRecognizer | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.recognizer = recognizer if recognizer is not None else scene_recognizer()
        for key in COUNTS:
            self.add_state(key, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, prompts: Sequence[SceneAttributes | str]) -> None:
        if len(images) != len(prompts):
            raise ValueError(f"compositional accuracy got {len(images)} images but {len(prompts)} prompts")
        for found, asked in zip(self.recognizer(images), as_attributes(prompts)):
            for key, value in score_prompt(found, asked).items():
                setattr(self, key, getattr(self, key) + value)

    def compute(self) -> dict[str, float]:
        return rates({key: getattr(self, key).item() for key in COUNTS})


def compositional_accuracy(images: torch.Tensor, prompts: Sequence[SceneAttributes | str],
                           recognizer: SceneRecognizer | None = None) -> dict[str, float]:  # fmt: skip
    """Rates of ``images`` against their ``prompts`` in one call."""
    metric = CompositionalAccuracy(recognizer)
    metric.update(images, prompts)
    return metric.compute()


def read_captions(path: str | Path) -> list[str]:
    """Captions from a text file, one per line (blank lines skipped); one-line errors for a missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist; give a text file with one caption per line")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def captions_file_accuracy(images: torch.Tensor, path: str | Path,
                           recognizer: SceneRecognizer | None = None) -> dict[str, float]:  # fmt: skip
    """Compositional accuracy of ``images[i]`` against line ``i`` of a captions file (as many lines as images)."""
    captions = read_captions(path)
    if len(captions) != len(images):
        raise ValueError(f"captions file {path} has {len(captions)} captions for {len(images)} images; give one "
                         "caption per image, in order")  # fmt: skip
    return compositional_accuracy(images, captions, recognizer)
