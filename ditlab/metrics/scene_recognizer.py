"""The scene recognizer: small CNNs that find the digits in a digit scene and read each one's identity, colour,
size and centre, so compositional accuracy can check generated images against their prompts.

GenEval (Ghosh et al., 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment") checks
prompts with an off-the-shelf detector and a colour classifier on the detected crops; digit scenes have no such
detector, so ditlab trains its own, once, on the scenes' own attributes (train-split glyphs only),
deterministically, and caches it under ``$DITLAB_CACHE`` keyed by a hash of its recipe (which names the dataset
version), like the digits classifier (``ditlab.metrics.features``). Two stages, as GenEval's:

- a CenterNet-style detector (Zhou et al., 2019, "Objects as Points"): a stride-4 map over the 32x32 scene (8x8
  cells) says per cell whether a digit's centre lies there, with the digit's size and the centre's offset from
  the cell (those two trained on the 3x3 cells around each centre, so a peak one cell off still reads them).
  Decoding keeps cells above ``threshold`` that are maxima of their 3x3 neighbourhood; two scene digits never
  share one (their boxes do not overlap, so centres are at least 10 px apart);
- a crop classifier: a 16x16 crop around each found digit (``torchvision.ops.roi_align``, box from the found size
  and centre) -> digit and colour. It trains on ground-truth crops shifted by up to ``jitter`` pixels and scaled by up to
  ``scale_jitter`` (the detector's typical errors), rotated and sheared a little.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from ditlab.data.scene_grammar import COLOURS, SIZE_PIXELS, SIZES, SceneAttributes
from ditlab.metrics.features import (
    cache_root,
    cached_training,
    one_cycle_adamw,
    recipe_digest,
    reproducible_training,
)

GRID = 8  # cells per side on the 32x32 input (stride 4)
INPUT = 32
CROP = 16
SIDES = tuple(SIZE_PIXELS[size] for size in SIZES)  # box side per size index, at 32x32


@dataclass(frozen=True)
class RecognizerRecipe:
    """Everything that determines the recognizer's weights; its hash names the cache file."""

    dataset: str = "digit-scenes-v1"
    num_train: int = 10_000
    num_eval: int = 1_000
    widths: tuple[int, int, int] = (16, 32, 48)
    crop_widths: tuple[int, int] = (24, 48)
    epochs: int = 8
    crop_epochs: int = 14
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    noise: float = 0.05
    jitter: float = 1.5
    scale_jitter: float = 0.1
    rotation: float = 12.0
    shear: float = 0.15
    seed: int = 0
    version: int = 2

    def digest(self) -> str:
        return recipe_digest(self)


@dataclass
class Detection:
    """One digit found in an image: its attributes, centre ``(x, y)`` in [0, 1] and objectness score."""

    digit: int
    colour: str
    size: str
    position: tuple[float, float]
    score: float


class SceneNet(nn.Module):
    """The detector: five 3x3 convs over three scales (32 -> 16 -> 8, receptive field 30 px) and a 1x1 head
    (objectness, sizes, 2 offsets)."""

    def __init__(self, recipe: RecognizerRecipe) -> None:
        super().__init__()
        a, b, c = recipe.widths
        self.body = nn.Sequential(
            nn.Conv2d(3, a, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(a, b, 3, padding=1), nn.SiLU(), nn.Conv2d(b, b, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(b, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Conv2d(c, 1 + len(SIZES) + 2, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = self.head(self.body(images)).split([1, len(SIZES), 2], dim=1)
        return dict(zip(("objectness", "size", "offset"), parts))


class CropNet(nn.Module):
    """The crop classifier: conv-conv-pool twice on a 16x16 crop, then digit and colour logits."""

    def __init__(self, recipe: RecognizerRecipe) -> None:
        super().__init__()
        a, b = recipe.crop_widths
        self.body = nn.Sequential(
            nn.Conv2d(3, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(a, b, 3, padding=1), nn.SiLU(), nn.Conv2d(b, b, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(b * 16, 128), nn.SiLU(), nn.Dropout(0.2),
        )  # fmt: skip
        self.head = nn.Linear(128, 10 + len(COLOURS))

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(crops)).split([10, len(COLOURS)], dim=1)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """RGB ``(N, 3, 32, 32)`` in [-1, 1]: larger scenes are downscaled with antialiasing, grey repeated."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"the scene recognizer takes images (N, 3, H, W) in [-1, 1]; got {tuple(images.shape)}")
    images = images.float().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-2:] != (INPUT, INPUT):
        images = F.interpolate(images, size=(INPUT, INPUT), mode="bilinear", align_corners=False, antialias=True)
    return images


def crops(images: torch.Tensor, owners: torch.Tensor, centres: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """``(K, 3, 16, 16)`` crops of ``images[owners]`` around ``centres`` (``(K, 2)`` in [0, 1]), each a square of
    its digit's side (pixels at 32x32) plus a 2-pixel margin."""
    half = (sides.float() / 2 + 2)[:, None]
    centre = centres.float() * INPUT
    boxes = torch.cat([owners.float()[:, None], centre - half, centre + half], dim=1)
    return roi_align(images, boxes.to(images.dtype), output_size=CROP, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def targets(attributes: list[SceneAttributes]) -> dict[str, torch.Tensor]:
    """Detector targets: objectness ``(N, 8, 8)`` (1 at each digit's centre cell) and, at the 3x3 cells around it
    (each cell to its nearest centre), the size index (-1 elsewhere) and the centre's offset from the cell."""
    n = len(attributes)
    objectness = torch.zeros(n, GRID, GRID)
    size = torch.full((n, GRID, GRID), -1, dtype=torch.long)
    offset = torch.zeros(n, 2, GRID, GRID)
    nearest = torch.full((n, GRID, GRID), float("inf"))
    for i, scene in enumerate(attributes):
        for name, (x, y) in zip(scene.sizes, scene.positions):
            col, row = min(int(x * GRID), GRID - 1), min(int(y * GRID), GRID - 1)
            objectness[i, row, col] = 1.0
            for r in range(max(row - 1, 0), min(row + 2, GRID)):
                for c in range(max(col - 1, 0), min(col + 2, GRID)):
                    distance = (x * GRID - c - 0.5) ** 2 + (y * GRID - r - 0.5) ** 2
                    if distance < nearest[i, r, c]:
                        nearest[i, r, c], size[i, r, c] = distance, SIZES.index(name)
                        offset[i, :, r, c] = torch.tensor([x * GRID - c, y * GRID - r])
    return {"objectness": objectness, "size": size, "offset": offset}


def detection_loss(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Objectness BCE over all cells; size cross-entropy and offset L1 around the centres."""
    loss = F.binary_cross_entropy_with_logits(out["objectness"][:, 0], target["objectness"], pos_weight=torch.tensor(4.0))
    near = target["size"] >= 0
    loss = loss + F.cross_entropy(out["size"].permute(0, 2, 3, 1)[near], target["size"][near])
    return loss + F.l1_loss(out["offset"].permute(0, 2, 3, 1)[near], target["offset"].permute(0, 2, 3, 1)[near])


@torch.no_grad()
def peaks(out: dict[str, torch.Tensor], threshold: float = 0.5) -> tuple[torch.Tensor, ...]:
    """Found digits: ``(owners, centres (K, 2) in [0, 1], size indices, scores)`` from the detector's output."""
    probability = torch.sigmoid(out["objectness"][:, 0])
    keep = (probability >= threshold) & (probability == F.max_pool2d(probability[:, None], 3, 1, 1)[:, 0])
    owners, rows, cols = keep.nonzero(as_tuple=True)
    offsets = out["offset"][owners, :, rows, cols]
    centres = torch.stack([cols + offsets[:, 0], rows + offsets[:, 1]], dim=1).clamp(0, GRID) / GRID
    sizes = out["size"][owners, :, rows, cols].argmax(1)
    return owners, centres, sizes, probability[owners, rows, cols]


class SceneRecognizer(nn.Module):
    """The frozen detector and crop classifier: ``recognizer(images) -> list of detections per image``."""

    def __init__(self, detector: SceneNet, classifier: CropNet, recipe: RecognizerRecipe, accuracy: dict,
                 fingerprint: str, threshold: float = 0.5, batch_size: int = 256) -> None:  # fmt: skip
        super().__init__()
        self.detector, self.classifier = detector.eval().requires_grad_(False), classifier.eval().requires_grad_(False)
        self.recipe, self.accuracy, self.fingerprint = recipe, accuracy, fingerprint
        self.threshold, self.batch_size = threshold, batch_size
        self.train_seconds: float | None = None

    def train(self, mode: bool = True) -> SceneRecognizer:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[list[Detection]]:
        device = next(self.detector.parameters()).device
        found: list[list[Detection]] = []
        for chunk in to_input(images).split(self.batch_size):
            found += detect(self.detector, self.classifier, chunk.to(device), self.threshold)
        return found


@torch.no_grad()
def detect(detector: SceneNet, classifier: CropNet, images: torch.Tensor, threshold: float = 0.5
           ) -> list[list[Detection]]:  # fmt: skip
    """Detections per image of 32x32 scenes in [-1, 1]."""
    owners, centres, sizes, scores = peaks(detector(images), threshold)
    found: list[list[Detection]] = [[] for _ in range(len(images))]
    if len(owners) == 0:
        return found
    sides = torch.tensor(SIDES, device=images.device)[sizes]
    digit_logits, colour_logits = classifier(crops(images, owners, centres, sides))
    rows = zip(owners.tolist(), centres.tolist(), sizes.tolist(), scores.tolist(), digit_logits.argmax(1).tolist(),
               colour_logits.argmax(1).tolist())  # fmt: skip
    for owner, (x, y), size, score, digit, colour in rows:
        found[owner].append(Detection(digit, COLOURS[colour], SIZES[size], (x, y), score))
    return found


def _warp(batch: torch.Tensor, degrees: float, shear: float, generator: torch.Generator) -> torch.Tensor:
    """Random rotations (up to ``degrees``) and shears (up to ``shear``) of crops: handwriting varies so, and 1,437
    training glyphs are few."""
    if degrees == 0 and shear == 0:
        return batch
    n = len(batch)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * degrees * torch.pi / 180
    slant = (torch.rand(n, generator=generator) * 2 - 1) * shear
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(n)
    theta = torch.stack([torch.stack([cos, -sin + slant * cos, zero], 1), torch.stack([sin, cos + slant * sin, zero], 1)], 1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _scene_tensors(split: str, num: int) -> tuple[torch.Tensor, list[SceneAttributes]]:
    """The first ``num`` scenes of ``split`` as uint8 ``(N, 3, 32, 32)`` with their attributes."""
    from ditlab.data.scenes import DigitScenes

    scenes = DigitScenes(split, 32, num)
    items = [scenes[i] for i in range(num)]
    images = torch.stack([((item["image"] + 1) * 127.5).round().to(torch.uint8) for item in items])
    return images, [item["attributes"] for item in items]


def _fit(network: nn.Module, num_items: int, epochs: int, recipe: RecognizerRecipe, generator: torch.Generator,
         loss_of, label: str) -> None:  # fmt: skip
    """One-cycle AdamW over shuffled batches of ``range(num_items)``; ``loss_of(index)`` gives a batch's loss."""
    from ditlab.progress import TaskProgress

    steps = epochs * (num_items // recipe.batch_size)
    optimizer, schedule = one_cycle_adamw(network, recipe.lr, recipe.weight_decay, steps)
    network.train()
    with TaskProgress(f"scene recognizer {label} (first use; cached after)", epochs, unit="epochs") as bar:
        for _ in range(epochs):
            permutation = torch.randperm(num_items, generator=generator)
            for start in range(0, num_items - recipe.batch_size + 1, recipe.batch_size):
                loss = loss_of(permutation[start : start + recipe.batch_size])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            bar.advance()
    network.eval()


def train_recognizer(recipe: RecognizerRecipe = RecognizerRecipe()) -> tuple[SceneNet, CropNet, dict]:
    """Train both stages on train-split scenes; returns them and their accuracy on validation-split scenes
    (held-out glyphs), as :func:`ditlab.metrics.compositional.compositional_accuracy` measures it."""
    from ditlab.data.scenes import SCENES_NAME
    from ditlab.metrics.compositional import score_detections

    if recipe.dataset != SCENES_NAME:
        raise ValueError(f"recognizer recipe is for {recipe.dataset}, but this ditlab generates {SCENES_NAME}; "
                         f"use RecognizerRecipe(dataset={SCENES_NAME!r})")  # fmt: skip
    images, attributes = _scene_tensors("train", recipe.num_train)
    target = targets(attributes)
    # every digit of every scene, for the crop classifier: its scene, centre, side, digit and colour
    owners = torch.tensor([i for i, s in enumerate(attributes) for _ in s.digits])
    centres = torch.tensor([p for s in attributes for p in s.positions])
    sides = torch.tensor([SIDES[SIZES.index(size)] for s in attributes for size in s.sizes])
    digits = torch.tensor([d for s in attributes for d in s.digits])
    colours = torch.tensor([COLOURS.index(c) for s in attributes for c in s.colours])
    with reproducible_training(recipe.seed, recipe.num_train, 0.0) as (generator, _, _):
        detector, classifier = SceneNet(recipe), CropNet(recipe)

        def pixels(index: torch.Tensor) -> torch.Tensor:
            batch = images[index].float() / 127.5 - 1.0
            return batch + recipe.noise * torch.randn(batch.shape, generator=generator)

        def detector_loss(index: torch.Tensor) -> torch.Tensor:
            return detection_loss(detector(pixels(index)), {key: value[index] for key, value in target.items()})

        def classifier_loss(index: torch.Tensor) -> torch.Tensor:
            shift = (torch.rand(len(index), 2, generator=generator) * 2 - 1) * recipe.jitter / INPUT
            scale = 1 + (torch.rand(len(index), generator=generator) * 2 - 1) * recipe.scale_jitter
            scene = pixels(owners[index])
            batch = crops(scene, torch.arange(len(index)), centres[index] + shift, sides[index] * scale)
            batch = _warp(batch, recipe.rotation, recipe.shear, generator)
            digit_logits, colour_logits = classifier(batch)
            return F.cross_entropy(digit_logits, digits[index]) + F.cross_entropy(colour_logits, colours[index])

        _fit(detector, recipe.num_train, recipe.epochs, recipe, generator, detector_loss, "detector")
        _fit(classifier, len(owners), recipe.crop_epochs, recipe, generator, classifier_loss, "crop classifier")
        held_images, held_attributes = _scene_tensors("validation", recipe.num_eval)
        found = detect(detector, classifier, held_images.float() / 127.5 - 1.0)
    accuracy = score_detections(found, held_attributes)
    return detector.requires_grad_(False), classifier.requires_grad_(False), accuracy


def scene_recognizer(cache_dir: str | Path | None = None, recipe: RecognizerRecipe = RecognizerRecipe(),
                     retrain: bool = False) -> SceneRecognizer:  # fmt: skip
    """The recognizer, trained once per recipe, then loaded from ``<cache>/scene-recognizer-<hash>.pt``."""
    path = cache_root(cache_dir) / f"scene-recognizer-{recipe.digest()}.pt"

    def train() -> dict:
        detector, classifier, accuracy = train_recognizer(recipe)
        return {"detector": detector.state_dict(), "classifier": classifier.state_dict(), "accuracy": accuracy,
                "recipe": asdict(recipe)}  # fmt: skip

    entry = cached_training(path, train, retrain)
    with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten; keep the caller's RNG as it was
        detector, classifier = SceneNet(recipe), CropNet(recipe)
    detector.load_state_dict(entry["detector"])
    classifier.load_state_dict(entry["classifier"])
    weights = [*entry["detector"].values(), *entry["classifier"].values()]
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in weights)).hexdigest()[:12]
    recognizer = SceneRecognizer(detector, classifier, recipe, entry["accuracy"], f"scene-recognizer-{digest}")
    recognizer.train_seconds = entry.get("train_seconds")
    return recognizer
