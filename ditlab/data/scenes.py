"""Digit scenes (``digit-scenes-v1``): a captioned RGB text-to-image testbed built offline from scikit-learn's digits.

Why: 8x8 grey digits with class labels are too small to show what text conditioning, alignment encoders, dynamic
compute or caching do. A scene puts one to three coloured digits on a coloured or textured canvas and says so in a
caption, with the structured attributes alongside, so CLIP score and GenEval-style compositional accuracy (Ghosh
et al., 2023) have something to measure. Nothing is downloaded or stored: scene ``i`` of a split is drawn from
``numpy.random.default_rng([SEED, split, i])`` (PCG64, the same stream on every platform and process) and rendered
on request, so the same index is the same image and caption everywhere.

Generator (version 1; any change to what follows changes ``SCENES_VERSION`` and so ``SCENES_NAME``):

- Glyphs: the 1,797 sklearn digits are split 80/10/10 into train / validation / test, stratified by digit
  (``train_test_split``, ``random_state=SEED``), so held-out scenes use glyphs never seen in training; the split
  name is also in every scene's seed, so the splits are disjoint by index too.
- Count: 1, 2 or 3 digits with probabilities 0.25 / 0.5 / 0.25. Digits uniform over 0-9 (repeats allowed), each
  from a uniform glyph of that digit in the split; colours uniform over ``COLOURS``, distinct within a scene,
  brightness scaled by U(0.8, 1); sizes uniform over ``small`` (10 px at 32x32) and ``large`` (14 px); the
  background uniform over ``BACKGROUNDS`` (four dark solid colours and three dark grey textures).
- Layout: top-left corners uniform on the 32x32 grid with every glyph box inside the canvas and no two boxes
  overlapping. Two digits get a relation uniform over ``RELATIONS`` first and a layout that satisfies it with
  the dominant axis at least 1.5x the other (unambiguous); three digits have no relation. The 64x64 option is the
  same scene at twice the scale (glyphs resampled from 8x8, textures repeated), so captions do not change.
- Rendering: the glyph (0..16 scaled to an alpha in [0, 1]) is resized bilinearly to its box and blends its colour
  over the background; pixels are quantised to uint8 and mapped to [-1, 1].

Captions follow the grammar in ``ditlab.data.scene_grammar``, e.g. "a small red 3 left of a large blue 7 on a
grey background". ``label`` is the first digit, so class-conditional configs run on scenes too.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import lightning as L
import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from ditlab.data.sampling import training_loader
from ditlab.data.scene_grammar import (
    BACKGROUNDS,
    COLOURS,
    DIGIT_WORDS,
    RELATIONS,
    SIZE_PIXELS,
    SIZES,
    SceneAttributes,
    parse_caption,
    relation_of,
)

__all__ = ["BACKGROUNDS", "COLOURS", "DIGIT_WORDS", "RELATIONS", "SCENES_NAME", "SIZES", "DigitScenes",
           "SceneAttributes", "ScenesDataModule", "glyph_split", "parse_caption", "relation_of"]  # fmt: skip

SCENES_VERSION = 1
SCENES_NAME = f"digit-scenes-v{SCENES_VERSION}"
SEED = 20231
SPLITS = ("train", "validation", "test")
DEFAULT_LENGTHS = {"train": 100_000, "validation": 5_000, "test": 5_000}
COUNT_PROBABILITIES = (0.25, 0.5, 0.25)
BASE = 32
RGB = {"red": (230, 40, 40), "green": (40, 190, 40), "blue": (50, 90, 245), "yellow": (240, 220, 40),
       "purple": (165, 60, 205), "cyan": (40, 215, 225), "white": (245, 245, 245), "orange": (250, 140, 20)}  # fmt: skip
SOLID = {"black": (10, 10, 10), "grey": (100, 100, 100), "brown": (90, 55, 25), "navy": (20, 25, 85)}
CLASS_NAMES = list(DIGIT_WORDS)


@lru_cache(maxsize=1)
def _glyphs() -> tuple[np.ndarray, np.ndarray]:
    """The sklearn digits as alphas in [0, 1] ``(1797, 8, 8)`` float32 and their labels."""
    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


@lru_cache(maxsize=1)
def glyph_split() -> dict[str, np.ndarray]:
    """Sorted sklearn glyph indices of each split (80/10/10, stratified by digit); disjoint and complete."""
    _, labels = _glyphs()
    everything = np.arange(len(labels))
    train, held = train_test_split(everything, test_size=0.2, stratify=labels, random_state=SEED)
    validation, test = train_test_split(held, test_size=0.5, stratify=labels[held], random_state=SEED)
    return {"train": np.sort(train), "validation": np.sort(validation), "test": np.sort(test)}


@lru_cache(maxsize=3)
def _pools(split: str) -> tuple[np.ndarray, ...]:
    """Per digit, the glyph indices of ``split``."""
    _, labels = _glyphs()
    indices = glyph_split()[split]
    return tuple(indices[labels[indices] == digit] for digit in range(10))


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether boxes ``(left, top, size)`` share a pixel."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


def _centre(box: tuple[int, int, int]) -> tuple[float, float]:
    return ((box[0] + box[2] / 2) / BASE, (box[1] + box[2] / 2) / BASE)


def _unambiguous(a: tuple[int, int, int], b: tuple[int, int, int], relation: str) -> bool:
    (xa, ya), (xb, yb) = _centre(a), _centre(b)
    dx, dy = abs(xa - xb), abs(ya - yb)
    return relation_of((xa, ya), (xb, yb)) == relation and max(dx, dy) >= 1.5 * min(dx, dy)


def _layout(rng: np.random.Generator, sizes: list[int], relation: str | None) -> list[tuple[int, int, int]] | None:
    """Non-overlapping boxes for ``sizes`` (and ``relation`` for two), or None after 200 tries."""
    for _ in range(200):
        boxes = [(int(rng.integers(0, BASE - s + 1)), int(rng.integers(0, BASE - s + 1)), s) for s in sizes]
        if any(_overlap(boxes[i], boxes[j]) for i in range(len(boxes)) for j in range(i)):
            continue
        if relation is None or _unambiguous(boxes[0], boxes[1], relation):
            return boxes
    return None


class _Scene:
    """One scene's draws: its attributes plus what rendering needs (glyphs, boxes, brightness, texture seed)."""

    def __init__(self, split: str, index: int) -> None:
        rng = np.random.default_rng([SEED, SPLITS.index(split), index])
        count = int(rng.choice(3, p=COUNT_PROBABILITIES)) + 1
        digits = [int(d) for d in rng.integers(0, 10, count)]
        pools = _pools(split)
        self.glyphs = [int(pools[d][rng.integers(len(pools[d]))]) for d in digits]
        colours = [COLOURS[c] for c in rng.choice(len(COLOURS), count, replace=False)]
        self.brightness = rng.uniform(0.8, 1.0, count)
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))] if count == 2 else None
        while True:  # a crowded draw (rare) is redrawn with new sizes, from the same stream
            sizes = [SIZES[s] for s in rng.integers(0, len(SIZES), count)]
            boxes = _layout(rng, [SIZE_PIXELS[s] for s in sizes], relation)
            if boxes is not None:
                break
        self.boxes = boxes
        self.texture_seed = int(rng.integers(2**31))
        self.attributes = SceneAttributes(digits=digits, colours=colours, sizes=sizes,
                                          positions=[_centre(box) for box in boxes], relation=relation,
                                          background=background)  # fmt: skip

    def background(self) -> np.ndarray:
        """The 32x32 background ``(32, 32, 3)`` float32 in 0..255."""
        name = self.attributes.background
        if name in SOLID:
            return np.broadcast_to(np.array(SOLID[name], np.float32), (BASE, BASE, 3)).copy()
        rng = np.random.default_rng(self.texture_seed)
        rows, cols = np.mgrid[0:BASE, 0:BASE]
        if name == "speckled":
            tone = rng.uniform(20, 100, (BASE, BASE))
        else:
            period, phase = int(rng.integers(3, 6)), int(rng.integers(0, 8))
            if name == "striped":
                coordinate = rows if rng.integers(2) else cols
                tone = np.where((coordinate + phase) // period % 2 == 0, 35.0, 85.0)
            else:  # checkered
                tone = np.where(((rows + phase) // period + (cols + phase) // period) % 2 == 0, 30.0, 75.0)
        return np.repeat(tone[..., None], 3, axis=2).astype(np.float32)

    def render(self, size: int) -> np.ndarray:
        """The scene ``(size, size, 3)`` uint8, ``size`` a multiple of 32."""
        scale = size // BASE
        canvas = self.background()
        if scale > 1:
            canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
        alphas, _ = _glyphs()
        for glyph, (left, top, side), colour, bright in zip(self.glyphs, self.boxes, self.attributes.colours,
                                                            self.brightness):  # fmt: skip
            side, left, top = side * scale, left * scale, top * scale
            alpha = np.asarray(Image.fromarray(alphas[glyph], mode="F").resize((side, side), Image.BILINEAR))
            alpha = np.clip(alpha, 0.0, 1.0)[..., None]
            region = canvas[top : top + side, left : left + side]
            ink = np.array(RGB[colour], np.float32) * bright
            canvas[top : top + side, left : left + side] = region * (1 - alpha) + ink * alpha
        return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


class DigitScenes(Dataset):
    """``ds[i] -> {"image": (3, H, W) in [-1, 1], "caption": str, "label": first digit, "attributes"}``.

    ``split`` is ``train``, ``validation`` or ``test``; ``size`` 32 or 64; ``length`` the number of scenes
    (default 100,000 train, 5,000 validation and test; any length, the generator is indexed, not stored).
    """

    name = SCENES_NAME

    def __init__(self, split: str = "train", size: int = 32, length: int | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"digit scenes split {split!r} does not exist; choose one of {SPLITS}")
        if size not in (32, 64):
            raise ValueError(f"digit scenes size={size} is not offered; choose 32 or 64")
        if length is not None and length < 1:
            raise ValueError(f"digit scenes length={length} must be at least 1")
        self.split, self.size = split, size
        self.length = DEFAULT_LENGTHS[split] if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def _scene(self, index: int) -> _Scene:
        if not -self.length <= index < self.length:
            raise IndexError(f"scene {index} is outside the {self.split} split of {self.length} scenes")
        return _Scene(self.split, index % self.length)

    def __getitem__(self, index: int) -> dict:
        scene = self._scene(int(index))
        pixels = torch.from_numpy(scene.render(self.size)).permute(2, 0, 1).float()
        return {"image": pixels / 127.5 - 1.0, "caption": scene.attributes.caption(),
                "label": scene.attributes.digits[0], "attributes": scene.attributes}  # fmt: skip

    def attributes(self, indices: Iterable[int]) -> list[SceneAttributes]:
        """The attributes of ``indices`` without rendering."""
        return [self._scene(int(i)).attributes for i in indices]

    def captions(self, indices: Iterable[int]) -> list[str]:
        """The captions of ``indices`` without rendering."""
        return [attributes.caption() for attributes in self.attributes(indices)]

    def images(self, indices: Iterable[int]) -> torch.Tensor:
        """The images of ``indices`` stacked: ``(N, 3, H, W)`` in [-1, 1]."""
        return torch.stack([self[int(i)]["image"] for i in indices])


class _Pairs(Dataset):
    """A split as loader items: ``(image, label)``, or ``(image, label, caption)`` with ``captions``."""

    def __init__(self, scenes: DigitScenes, captions: bool) -> None:
        self.scenes, self.with_captions = scenes, captions

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple:
        item = self.scenes[index]
        if self.with_captions:
            return item["image"], item["label"], item["caption"]
        return item["image"], item["label"]


class ScenesDataModule(L.LightningDataModule):
    """Digit scenes for training: batches ``(images: (B, 3, S, S) in [-1, 1], labels: (B,))`` with the first
    digit as the class, plus ``captions: list[str]`` as a third element when ``captions=True`` (text-conditioned
    methods). The training order is seeded per epoch (``shuffle_seed``, default: the run's ``seed_everything``
    seed), dealt across processes and resumed mid-epoch exactly, as for the digits (``ditlab.data.sampling``).
    """

    num_classes = 10
    channels = 3
    class_names = CLASS_NAMES
    name = SCENES_NAME

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 32,
        train_length: int | None = None,
        val_length: int | None = None,
        captions: bool = False,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        if image_size not in (32, 64):
            raise ValueError(f"data.image_size={image_size} is not offered for digit scenes; choose 32 or 64")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be at least 1")
        for key, value in (("train_length", train_length), ("val_length", val_length)):
            if value is not None and value < 1:
                raise ValueError(f"data.{key}={value} must be at least 1 (or null for the default)")
        self.save_hyperparameters()
        self.batch_size, self.image_size, self.captions = batch_size, image_size, captions
        self.train_length, self.val_length, self.num_workers = train_length, val_length, num_workers
        self.shuffle_seed = torch.initial_seed() % 2**62 if shuffle_seed is None else shuffle_seed
        self.train_set: _Pairs | None = None
        self.val_set: _Pairs | None = None
        self.test_set: _Pairs | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = _Pairs(DigitScenes("train", self.image_size, self.train_length), self.captions)
        self.val_set = _Pairs(DigitScenes("validation", self.image_size, self.val_length), self.captions)
        self.test_set = _Pairs(DigitScenes("test", self.image_size, self.val_length), self.captions)
        if self.batch_size > len(self.train_set):
            raise ValueError(f"data.batch_size={self.batch_size} is larger than the scenes training split "
                             f"({len(self.train_set)}); use at most {len(self.train_set)} or raise data.train_length")  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return training_loader(self.train_set, self.batch_size, self.shuffle_seed, getattr(self, "trainer", None),
                               num_workers=self.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size, num_workers=self.num_workers)
