"""The scene recognizer: a small CNN that finds the digits in a digit scene and reads each one's identity, colour,
size and centre, so compositional accuracy can check generated images against their prompts.

GenEval (Ghosh et al., 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image Alignment") checks
prompts with an off-the-shelf detector; on digit scenes no such detector exists, so ditlab trains its own, once,
on the scenes' own attributes (train-split glyphs only), deterministically, and caches it under ``$DITLAB_CACHE``
keyed by a hash of its recipe (which names the dataset version), like the digits classifier
(``ditlab.metrics.features``).

It is a CenterNet-style detector (Zhou et al., 2019, "Objects as Points"): a stride-4 map over the 32x32 scene
(8x8 cells) predicts per cell whether a digit's centre lies there, its digit, colour and size, and the centre's
offset within the cell. Decoding keeps cells above ``threshold`` that are maxima of their 3x3 neighbourhood; two
scene digits never share a neighbourhood (their boxes do not overlap, so centres are at least 10 px apart).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.data.scene_grammar import COLOURS, SIZES, SceneAttributes
from ditlab.metrics.features import cache_root, cached_training, one_cycle_adamw, reproducible_training

GRID = 8  # cells per side on the 32x32 input (stride 4)
INPUT = 32


@dataclass(frozen=True)
class RecognizerRecipe:
    """Everything that determines the recognizer's weights; its hash names the cache file."""

    dataset: str = "digit-scenes-v1"
    num_train: int = 10_000
    num_eval: int = 1_000
    widths: tuple[int, int, int] = (16, 32, 64)
    epochs: int = 5
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    noise: float = 0.05
    seed: int = 0
    version: int = 1

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Detection:
    """One digit found in an image: its attributes, centre ``(x, y)`` in [0, 1] and objectness score."""

    digit: int
    colour: str
    size: str
    position: tuple[float, float]
    score: float


class SceneNet(nn.Module):
    """Five 3x3 convs over three scales (32 -> 16 -> 8, receptive field 30 px) and a 1x1 head: objectness, 10 digits, colours, sizes, 2 offsets."""

    def __init__(self, recipe: RecognizerRecipe) -> None:
        super().__init__()
        a, b, c = recipe.widths
        self.body = nn.Sequential(
            nn.Conv2d(3, a, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(a, b, 3, padding=1), nn.SiLU(), nn.Conv2d(b, b, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(b, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Conv2d(c, 1 + 10 + len(COLOURS) + len(SIZES) + 2, 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.head(self.body(images))
        parts = out.split([1, 10, len(COLOURS), len(SIZES), 2], dim=1)
        return dict(zip(("objectness", "digit", "colour", "size", "offset"), parts))


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


def targets(attributes: list[SceneAttributes]) -> dict[str, torch.Tensor]:
    """Per-cell training targets of scenes: objectness ``(N, 8, 8)``, class indices (-1 off centre), offsets."""
    n = len(attributes)
    objectness = torch.zeros(n, GRID, GRID)
    labels = {key: torch.full((n, GRID, GRID), -1, dtype=torch.long) for key in ("digit", "colour", "size")}
    offset = torch.zeros(n, 2, GRID, GRID)
    for i, scene in enumerate(attributes):
        for digit, colour, size, (x, y) in zip(scene.digits, scene.colours, scene.sizes, scene.positions):
            col, row = min(int(x * GRID), GRID - 1), min(int(y * GRID), GRID - 1)
            objectness[i, row, col] = 1.0
            labels["digit"][i, row, col] = digit
            labels["colour"][i, row, col] = COLOURS.index(colour)
            labels["size"][i, row, col] = SIZES.index(size)
            offset[i, :, row, col] = torch.tensor([x * GRID - col, y * GRID - row])
    return {"objectness": objectness, **labels, "offset": offset}


def detection_loss(out: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Objectness BCE over all cells, cross-entropies and offset L1 at the centre cells."""
    loss = F.binary_cross_entropy_with_logits(out["objectness"][:, 0], target["objectness"], pos_weight=torch.tensor(4.0))
    centres = target["digit"] >= 0
    for key in ("digit", "colour", "size"):
        loss = loss + F.cross_entropy(out[key].permute(0, 2, 3, 1)[centres], target[key][centres])
    offsets = torch.sigmoid(out["offset"]).permute(0, 2, 3, 1)[centres]
    return loss + 4.0 * F.l1_loss(offsets, target["offset"].permute(0, 2, 3, 1)[centres])


@torch.no_grad()
def decode(out: dict[str, torch.Tensor], threshold: float = 0.5) -> list[list[Detection]]:
    """Detections per image: cells above ``threshold`` that are 3x3 local maxima of objectness."""
    probability = torch.sigmoid(out["objectness"][:, 0])
    peaks = (probability >= threshold) & (probability == F.max_pool2d(probability[:, None], 3, 1, 1)[:, 0])
    offsets = torch.sigmoid(out["offset"])
    found: list[list[Detection]] = [[] for _ in range(len(probability))]
    for i, row, col in peaks.nonzero().tolist():
        x = (col + offsets[i, 0, row, col].item()) / GRID
        y = (row + offsets[i, 1, row, col].item()) / GRID
        found[i].append(Detection(digit=int(out["digit"][i, :, row, col].argmax()),
                                  colour=COLOURS[int(out["colour"][i, :, row, col].argmax())],
                                  size=SIZES[int(out["size"][i, :, row, col].argmax())], position=(x, y),
                                  score=probability[i, row, col].item()))  # fmt: skip
    return found


class SceneRecognizer(nn.Module):
    """A frozen :class:`SceneNet`: ``recognizer(images) -> list of detections per image``."""

    def __init__(self, network: SceneNet, recipe: RecognizerRecipe, accuracy: dict, fingerprint: str,
                 threshold: float = 0.5, batch_size: int = 256) -> None:  # fmt: skip
        super().__init__()
        self.network, self.recipe, self.accuracy = network.eval().requires_grad_(False), recipe, accuracy
        self.fingerprint, self.threshold, self.batch_size = fingerprint, threshold, batch_size
        self.train_seconds: float | None = None

    def train(self, mode: bool = True) -> SceneRecognizer:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[list[Detection]]:
        device = next(self.network.parameters()).device
        found: list[list[Detection]] = []
        for chunk in to_input(images).split(self.batch_size):
            found += decode(self.network(chunk.to(device)), self.threshold)
        return found


def _scene_tensors(split: str, num: int) -> tuple[torch.Tensor, list[SceneAttributes]]:
    """The first ``num`` scenes of ``split`` as uint8 ``(N, 3, 32, 32)`` with their attributes."""
    from ditlab.data.scenes import DigitScenes

    scenes = DigitScenes(split, 32, num)
    items = [scenes[i] for i in range(num)]
    images = torch.stack([((item["image"] + 1) * 127.5).round().to(torch.uint8) for item in items])
    return images, [item["attributes"] for item in items]


def train_recognizer(recipe: RecognizerRecipe = RecognizerRecipe()) -> tuple[SceneNet, dict]:
    """Train on train-split scenes; returns the network and its accuracy on validation-split scenes (held-out
    glyphs), as :func:`ditlab.metrics.compositional.compositional_accuracy` measures it."""
    from ditlab.data.scenes import SCENES_NAME
    from ditlab.metrics.compositional import score_detections
    from ditlab.progress import TaskProgress

    if recipe.dataset != SCENES_NAME:
        raise ValueError(f"recognizer recipe is for {recipe.dataset}, but this ditlab generates {SCENES_NAME}; "
                         f"use RecognizerRecipe(dataset={SCENES_NAME!r})")  # fmt: skip
    images, attributes = _scene_tensors("train", recipe.num_train)
    target = targets(attributes)
    with reproducible_training(recipe.seed, recipe.num_train, 0.0) as (generator, train, _):
        network = SceneNet(recipe)
        steps = recipe.epochs * (len(train) // recipe.batch_size)
        optimizer, schedule = one_cycle_adamw(network, recipe.lr, recipe.weight_decay, steps)
        network.train()
        with TaskProgress("scene recognizer (first use; cached after)", recipe.epochs, unit="epochs") as bar:
            for _ in range(recipe.epochs):
                permutation = train[torch.randperm(len(train), generator=generator)]
                for start in range(0, len(permutation) - recipe.batch_size + 1, recipe.batch_size):
                    index = permutation[start : start + recipe.batch_size]
                    batch = images[index].float() / 127.5 - 1.0
                    batch = batch + recipe.noise * torch.randn(batch.shape, generator=generator)
                    loss = detection_loss(network(batch), {key: value[index] for key, value in target.items()})
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                bar.advance()
        network.eval()
        held_images, held_attributes = _scene_tensors("validation", recipe.num_eval)
        with torch.no_grad():
            found = decode(network(held_images.float() / 127.5 - 1.0))
    return network.requires_grad_(False), score_detections(found, held_attributes)


def scene_recognizer(cache_dir: str | Path | None = None, recipe: RecognizerRecipe = RecognizerRecipe(),
                     retrain: bool = False) -> SceneRecognizer:  # fmt: skip
    """The recognizer, trained once per recipe, then loaded from ``<cache>/scene-recognizer-<hash>.pt``."""
    path = cache_root(cache_dir) / f"scene-recognizer-{recipe.digest()}.pt"

    def train() -> dict:
        network, accuracy = train_recognizer(recipe)
        return {"state_dict": network.state_dict(), "accuracy": accuracy, "recipe": asdict(recipe)}

    entry = cached_training(path, train, retrain)
    with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten; keep the caller's RNG as it was
        network = SceneNet(recipe)
    network.load_state_dict(entry["state_dict"])
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in entry["state_dict"].values())).hexdigest()[:12]
    recognizer = SceneRecognizer(network, recipe, entry["accuracy"], f"scene-recognizer-{digest}")
    recognizer.train_seconds = entry.get("train_seconds")
    return recognizer
