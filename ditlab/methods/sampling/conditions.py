"""The conditions a trained sampling-time method (a cache router, a feedback block) rolls its teacher out on.

Learning-to-Cache, HarmoniCa and ILF train on trajectories of the frozen teacher. A class-conditional teacher is
rolled out on uniformly drawn classes, its null class for guidance and label drop-out. A text-conditioned teacher
(PixArt, MM-DiT: ``DiTConfig.condition: text``) is rolled out on captions instead: those of uniformly drawn digit
scenes of the training split (the captions its text encoder was trained on), encoded by the teacher's own frozen
text encoder (``ditlab.models.text.prompts``); its null condition is the empty caption
(:data:`~ditlab.diffusion.guidance.EMPTY_CAPTION`), so a dropped caption is ``""``. Captions stay strings until a
trajectory is built, so a checkpoint stores them as text and a resumed run re-encodes the same features.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ditlab.diffusion.global_batch import draw_rows
from ditlab.models.text.features import TextFeatures
from ditlab.models.text.prompts import condition_input, is_captions

Conditions = torch.Tensor | list[str]
"""Class labels ``(B,)`` or captions (one ``str`` per row)."""


@lru_cache(maxsize=1)
def training_scenes():
    """The digit scenes' training split (procedural: captions are made on demand, nothing is rendered)."""
    from ditlab.data.scenes import DigitScenes

    return DigitScenes("train")


def draw_conditions(teacher, generator: torch.Generator, count: int, device: torch.device | str, rank: int = 0,
                    world_size: int = 1) -> Conditions:  # fmt: skip
    """This process's rows of one global draw of ``count`` conditions from ``generator`` (so the process count does
    not change them): classes uniform over ``teacher.num_classes``, or the captions of uniformly drawn training
    scenes for a text-conditioned teacher."""
    if not teacher.config.text_conditioned:
        return draw_rows(lambda n: torch.randint(teacher.num_classes, (n,), device=device, generator=generator), count,
                         rank, world_size)  # fmt: skip
    scenes = training_scenes()
    picks = draw_rows(lambda n: torch.randint(len(scenes), (n,), device=device, generator=generator), count, rank,
                      world_size)  # fmt: skip
    return scenes.captions(picks.tolist())


def drop_conditions(conditions: Conditions, drop: torch.Tensor, null_label: int) -> Conditions:
    """``conditions`` with the rows where ``drop`` is true replaced by the null class, or captions by ``""``."""
    if is_captions(conditions):
        return ["" if dropped else caption for caption, dropped in zip(conditions, drop.tolist())]
    return torch.where(drop, torch.full_like(conditions, null_label), conditions)


def null_count(conditions: Conditions, null_label: int) -> int:
    """How many rows are the null condition (the null class, or the empty caption)."""
    if is_captions(conditions):
        return sum(caption == "" for caption in conditions)
    return int((conditions == null_label).sum())


def encode_conditions(teacher, conditions, device: torch.device | str):
    """``conditions`` as the teacher takes them: captions encoded by its text encoder on ``device``; labels and
    ``TextFeatures`` moved there. One line when they do not fit the teacher's condition."""
    taken = condition_input(teacher.config, conditions, device)
    return taken.to(device)


def repeat_conditions(conditions, times: int):
    """Encoded conditions stacked ``times`` times (rows ``[c; c; ...]``), labels or ``TextFeatures``."""
    if isinstance(conditions, TextFeatures):
        return TextFeatures.cat([conditions] * times)
    return conditions.repeat(times)


def batch_conditions(teacher, batch, who: str) -> Conditions:
    """The conditions of a loader batch for ``teacher``: its labels ``batch[1]``, or for a text-conditioned teacher its
    captions (``(images, labels, captions)`` of the digit scenes with captions, or ``(images, captions)``); refused in
    one line when a text-conditioned teacher gets a batch without captions."""
    if not teacher.config.text_conditioned:
        return batch[1]
    captions = batch[2] if len(batch) > 2 else batch[1]
    if not is_captions(captions):
        raise ValueError(f"{who} on a text-conditioned teacher trains on (image, caption) pairs, but the batches carry "
                         "no captions; use the digit scenes with captions (data: ditlab.data.scenes.ScenesDataModule, "
                         "captions: true)")  # fmt: skip
    return list(captions)


def saved_conditions(conditions: Conditions) -> Conditions:
    """What a checkpoint stores of a trajectory's conditions: labels as they are, captions as their text."""
    return list(conditions) if is_captions(conditions) else conditions


def loaded_conditions(saved, device: torch.device | str) -> Conditions:
    """Saved conditions back on ``device`` (captions stay text until a trajectory encodes them)."""
    return list(saved) if is_captions(saved) else saved.to(device)
