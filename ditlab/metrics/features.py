"""Feature extractors for image metrics, behind one interface.

FID (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") compares Gaussian fits of a network's features; the Inception Score (Salimans et al., 2016)
and improved precision/recall (Kynkaanniemi et al., 2019) read the same network. Two networks are offered:

- ``inception-v3``: the TF-ported Inception-v3 of torch-fidelity through torchmetrics'
  ``NoTrainInceptionV3`` with ``antialias=False`` (the ADM / torch-fidelity resize), from a local weight
  file only; it never downloads.
- ``digits-classifier``: a small CNN that ditlab trains itself, deterministically and in seconds, on
  scikit-learn's digits, cached on disk by a hash of its recipe. Inception features of 8x8 grey digits
  say little; a classifier trained on the data in question is the usual stand-in (as MNIST FIDs do).

Every extractor takes images ``(N, C, H, W)`` in [-1, 1] of any size and channel count and returns
``(N, F)`` features; :meth:`FeatureExtractor.features_and_logits` also returns class logits for IS.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditlab.atomic import save_torch

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def cache_root(path: str | Path | None = None) -> Path:
    """Where ditlab keeps what it computes once: ``path``, else ``$DITLAB_CACHE``, else ``~/.cache/ditlab``."""
    if path is None:
        path = os.environ.get("DITLAB_CACHE") or Path.home() / ".cache" / "ditlab"
    return Path(path).expanduser()


def recipe_digest(recipe: Any, **extra: Any) -> str:
    """The short hash that names a self-trained network's cache file: every field of its recipe (a dataclass, or its
    fields as a dict) and ``extra`` (what else determines the weights, e.g. the dataset), so a changed recipe trains
    anew."""
    text = json.dumps({**(recipe if isinstance(recipe, dict) else asdict(recipe)), **extra}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_training(path: Path, train: Callable[[], dict], retrain: bool = False) -> dict:
    """A self-trained network's entry from ``path``, or ``train()``'s (timed, saved atomically) when absent.

    A corrupt cache file is simply rebuilt.
    """
    if path.is_file() and not retrain:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            pass
    started = time.perf_counter()
    entry = {**train(), "train_seconds": time.perf_counter() - started}
    save_torch(entry, path)
    return entry


@contextmanager
def reproducible_training(seed: int, num_items: int, holdout_fraction: float
                          ) -> Iterator[tuple[torch.Generator, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Deterministic, single-thread training from ``seed`` for the self-trained digits networks.

    Yields a seeded generator and a ``(train, holdout)`` index split of ``num_items``; gradients are on (callers
    may be sampling under ``no_grad``), and the caller's RNG, thread count and determinism setting come back
    after. One thread gives the same reduction order on every machine and no oversubscription under DDP.
    """
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(num_items, generator=generator)
            num_holdout = int(round(holdout_fraction * num_items))
            yield generator, order[num_holdout:], order[:num_holdout]
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def one_cycle_adamw(network: nn.Module, lr: float, weight_decay: float, total_steps: int):
    """AdamW with a one-cycle learning-rate schedule peaking at ``lr``: ``(optimizer, schedule)``."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)


class FeatureExtractor(nn.Module):
    """A frozen network: ``extractor(images: (N, C, H, W) in [-1, 1]) -> (N, num_features)``.

    ``name`` is what metric results report as ``fid_features``; ``fingerprint`` identifies the weights, so
    cached reference statistics are never mixed across networks. It stays in eval mode, never needs
    gradients, and is an ``nn.Module`` so torchmetrics accepts it as a custom ``feature=`` network.
    """

    name: str = "features"
    num_features: int = 0
    fingerprint: str = ""

    def __init__(self, batch_size: int = 256) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, logits)`` for one batch already on ``self.device``."""
        raise NotImplementedError

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor,
                            progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``features: (N, F)`` and ``logits: (N, classes)``, float32 on the input's device, in batches;
        ``progress`` names a progress bar (or log lines, ``ditlab.progress``) over the images."""
        from ditlab.progress import TaskProgress

        if images.dim() != 4:
            raise ValueError(
                f"{self.name} expects images (N, C, H, W) in [-1, 1]; got shape {tuple(images.shape)}"
            )
        features, logits = [], []
        with TaskProgress(progress or "features", len(images), enabled=progress is not None) as bar:
            for chunk in images.split(self.batch_size):
                chunk_features, chunk_logits = self._batch(chunk.to(self.device, torch.float32))
                features.append(chunk_features.float().to(images.device))
                logits.append(chunk_logits.float().to(images.device))
                bar.advance(len(chunk))
        if not features:
            return images.new_zeros(0, self.num_features), images.new_zeros(0, 0)
        return torch.cat(features), torch.cat(logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


# ----------------------------------------------------------------------------------------- weight files
def explicit_weight_file(explicit: str | Path, filename: str) -> Path:
    """A user-given weight path: the file itself, or ``filename`` inside the given folder."""
    path = Path(explicit).expanduser()
    return path / filename if path.is_dir() else path


def weight_file_candidates(filename: str) -> list[Path]:
    """Where a downloaded weight file may already be: ``$DITLAB_WEIGHTS_DIR``, torch hub's checkpoints, ditlab's
    cache (in that order)."""
    candidates = [Path(torch.hub.get_dir()) / "checkpoints" / filename, cache_root() / filename]
    if os.environ.get("DITLAB_WEIGHTS_DIR"):
        candidates.insert(0, Path(os.environ["DITLAB_WEIGHTS_DIR"]).expanduser() / filename)
    return candidates


# ----------------------------------------------------------------------------------------- Inception-v3
def inception_weights_path(weights: str | Path | None = None) -> Path:
    """The local Inception-v3 weight file: ``weights``, ``$DITLAB_INCEPTION_WEIGHTS``, then the usual folders."""
    explicit = weights or os.environ.get("DITLAB_INCEPTION_WEIGHTS")
    if explicit:
        path = explicit_weight_file(explicit, INCEPTION_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"Inception-v3 weights {path} do not exist; pass the path of a local copy of "
                                    f"{INCEPTION_FILE} (download it on a networked machine from {INCEPTION_URL})")  # fmt: skip
        return path
    candidates = weight_file_candidates(INCEPTION_FILE)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Inception-v3 weights {INCEPTION_FILE} not found (looked in {', '.join(str(p.parent) for p in candidates)}); "
        f"set DITLAB_INCEPTION_WEIGHTS (or --inception-weights) to a local copy, downloaded on a networked machine "
        f"from {INCEPTION_URL}"
    )


class InceptionV3(FeatureExtractor):
    """Inception-v3 pool features (2048) and unbiased logits (1008), the FID/IS network of ADM and torchmetrics."""

    name = "inception-v3"
    num_features = 2048

    def __init__(self, weights: str | Path | None = None, batch_size: int = 64) -> None:
        super().__init__(batch_size)
        path = inception_weights_path(weights)
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as error:  # pragma: no cover - torch-fidelity is a dependency
            raise ModuleNotFoundError(
                "inception-v3 features need torch-fidelity: pip install torch-fidelity"
            ) from error
        self.network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(path), antialias=False)  # fmt: skip
        self.fingerprint = f"{INCEPTION_FILE}:{path.stat().st_size}"

    def _batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = (
            ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        )  # the uint8 input it was ported for
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        features = self.network(pixels)
        return features, features @ self.network.fc.weight.T  # "logits_unbiased", as torchmetrics' IS uses


def inception_v3(weights: str | Path | None = None, batch_size: int = 64) -> InceptionV3:
    """Inception-v3 features from a local weight file; a one-line ``FileNotFoundError`` when there is none."""
    return InceptionV3(weights, batch_size)


# ----------------------------------------------------------------------------------------- digits classifier
@dataclass(frozen=True)
class ClassifierRecipe:
    """Everything that determines the digits classifier's weights; its hash names the cache file."""

    image_size: int = 16
    widths: tuple[int, int] = (16, 32)
    num_features: int = 64
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1
    holdout_fraction: float = 0.2
    seed: int = 0
    version: int = 1

    def digest(self) -> str:
        return recipe_digest(self)


class DigitsNet(nn.Module):
    """Conv-pool-conv-pool, then a ``num_features`` penultimate layer (the FID features) and 10 logits."""

    def __init__(self, recipe: ClassifierRecipe) -> None:
        super().__init__()
        narrow, wide = recipe.widths
        self.body = nn.Sequential(
            nn.Conv2d(1, narrow, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(narrow, wide, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(wide * 16, recipe.num_features), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Linear(recipe.num_features, 10)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(images)
        return features, self.head(features)


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Grey ``(N, 1, size, size)``: channels averaged; upscaling bilinear as ``digits_tensors`` does, downscaling antialiased."""
    if images.shape[1] != 1:
        images = images.mean(dim=1, keepdim=True)
    if images.shape[-2:] == (size, size):
        return images
    antialias = images.shape[-1] > size or images.shape[-2] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def _shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (zero-padded with -1, the background)."""
    if max_shift == 0:
        return images
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    size = images.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets.tolist())]
    )


def train_digits_classifier(recipe: ClassifierRecipe = ClassifierRecipe()) -> tuple[DigitsNet, float]:
    """Train on a fixed split of the digits; returns the network and its held-out accuracy.

    Seeds are fixed and deterministic algorithms are on, and the caller's RNG state is left as it was, so
    calling this in the middle of a training run changes nothing there.
    """
    from ditlab.data.digits import digits_tensors
    from ditlab.progress import TaskProgress

    images, labels = digits_tensors(recipe.image_size)
    with reproducible_training(recipe.seed, len(labels), recipe.holdout_fraction) as (generator, train, holdout):
        network = DigitsNet(recipe)
        steps = recipe.epochs * (len(train) // recipe.batch_size)
        optimizer, schedule = one_cycle_adamw(network, recipe.lr, recipe.weight_decay, steps)
        network.train()
        with TaskProgress("digits classifier (first use; cached after)", recipe.epochs, unit="epochs") as bar:
            for _ in range(recipe.epochs):
                permutation = train[torch.randperm(len(train), generator=generator)]
                for start in range(0, len(permutation) - recipe.batch_size + 1, recipe.batch_size):
                    index = permutation[start : start + recipe.batch_size]
                    batch = _shift(images[index], recipe.max_shift, generator)
                    loss = F.cross_entropy(network(batch)[1], labels[index])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                bar.advance()
        network.eval()
        with torch.no_grad():
            accuracy = (network(images[holdout])[1].argmax(1) == labels[holdout]).float().mean().item()
    return network.requires_grad_(False), accuracy


class DigitsClassifier(FeatureExtractor):
    """Penultimate-layer features and logits of ditlab's own digits CNN (any input size, resized to its own)."""

    name = "digits-classifier"

    def __init__(self, network: DigitsNet, recipe: ClassifierRecipe, accuracy: float, fingerprint: str,
                 batch_size: int = 512) -> None:  # fmt: skip
        super().__init__(batch_size)
        self.network, self.recipe, self.accuracy = network.eval(), recipe, accuracy
        self.num_features, self.fingerprint = recipe.num_features, fingerprint

    def _batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network(resize_to(images.clamp(-1, 1), self.recipe.image_size))


def digits_classifier(cache_dir: str | Path | None = None, recipe: ClassifierRecipe = ClassifierRecipe(),
                      retrain: bool = False) -> DigitsClassifier:  # fmt: skip
    """The digits classifier, trained once per recipe and then loaded from ``<cache>/digits-classifier-<hash>.pt``."""
    path = cache_root(cache_dir) / f"digits-classifier-{recipe.digest()}.pt"

    def train() -> dict:
        network, accuracy = train_digits_classifier(recipe)
        return {"state_dict": network.state_dict(), "accuracy": accuracy, "recipe": asdict(recipe)}

    entry = cached_training(path, train, retrain)
    with torch.random.fork_rng(
        devices=[]
    ):  # the initialisation is overwritten; keep the caller's RNG as it was
        network = DigitsNet(recipe)
    network.load_state_dict(entry["state_dict"])
    network.requires_grad_(False)
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in entry["state_dict"].values())).hexdigest()[
        :12
    ]
    extractor = DigitsClassifier(network, recipe, entry["accuracy"], f"digits-classifier-{digest}")
    extractor.train_seconds = entry.get("train_seconds")
    return extractor


# ----------------------------------------------------------------------------------------- factory
def scene_clip_features(cache_dir: str | Path | None = None, batch_size: int = 256) -> FeatureExtractor:
    """The image embeddings of ditlab's scene CLIP (``ditlab.metrics.scene_clip``), for FID on digit scenes."""
    from ditlab.metrics.scene_clip import scene_clip_features as build

    return build(cache_dir, batch_size)


def scene_clip_first_features(cache_dir: str | Path | None = None, batch_size: int = 256) -> FeatureExtractor:
    """The first recipe's scene CLIP (``FIRST_RECIPE``: no digit losses, separately trained weights): a FID space
    for the digit scenes that a run aligned to the default scene CLIP (REPA with ``encoder: scene-clip``) was not
    trained towards, so alignment cannot score itself."""
    from ditlab.metrics.scene_clip import FIRST_RECIPE
    from ditlab.metrics.scene_clip import scene_clip_features as build

    return build(cache_dir, batch_size, FIRST_RECIPE, "scene-clip-first")


EXTRACTORS = {"inception-v3": inception_v3, "digits-classifier": digits_classifier, "scene-clip": scene_clip_features,
              "scene-clip-first": scene_clip_first_features}  # fmt: skip


def feature_extractor(name: str, **kwargs) -> FeatureExtractor:
    """``feature_extractor("digits-classifier")`` or ``feature_extractor("inception-v3", weights=PATH)``."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; choices: {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](**kwargs)
