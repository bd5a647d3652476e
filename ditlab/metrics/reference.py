"""Reference statistics for FID (Heusel et al., 2017): where the "real" side of the comparison comes from.

- ``"digits"``: all 1,797 scikit-learn digits (the train and val splits together) at a given image size,
  pushed through the chosen feature network; cached on disk per network fingerprint and image size.
- ``"scenes"``: the first 10,000 training digit scenes (``ditlab.data.scenes``, RGB) at a given image size, through
  the chosen network (``scene-clip`` features: FID on the scene CLIP's image embeddings); cached like ``digits``.
- ``PATH.npz``: an ADM-style reference batch (``VIRTUAL_imagenet256_labeled.npz``): its ``mu``/``sigma``
  when they fit the network's feature size, otherwise its ``arr_0`` images (uint8, NHWC).
- ``"cleanfid:NAME"``: a clean-fid statistics file (Parmar et al., 2022) already on disk, e.g.
  ``cleanfid:cifar10_clean_train_32`` reads ``<cleanfid>/stats/cifar10_clean_train_32.npz``. Those were
  made with clean-fid's own Inception and PIL resize, so they fit ``inception-v3`` features only roughly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditlab.atomic import save_torch
from ditlab.metrics.features import FeatureExtractor, cache_root

CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"


@dataclass
class ReferenceStats:
    """``mu: (F,)``, ``sigma: (F, F)`` (float64) and, where the images were seen, their ``features: (M, F)``."""

    name: str
    mu: torch.Tensor
    sigma: torch.Tensor
    num_samples: int | None
    features: torch.Tensor | None = None


def images_from_uint8(array: np.ndarray) -> torch.Tensor:
    """ADM batch layout ``(N, H, W, C)`` uint8 -> ``(N, C, H, W)`` float in [-1, 1]."""
    if array.ndim == 3:
        array = array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _from_features(name: str, features: torch.Tensor) -> ReferenceStats:
    from ditlab.metrics.fid import gaussian_stats

    mu, sigma = gaussian_stats(features)
    return ReferenceStats(name, mu, sigma, len(features), features.double())


def _digits(extractor: FeatureExtractor, image_size: int, cache_dir: str | Path | None,
            progress: bool) -> ReferenceStats:  # fmt: skip
    from ditlab.data.digits import digits_tensors

    path = cache_root(cache_dir) / f"reference-digits-{image_size}-{extractor.fingerprint}.pt"
    if path.is_file():
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            return ReferenceStats(**entry)
        except Exception:  # rebuilt below
            pass
    images, _ = digits_tensors(image_size)
    described = f"reference statistics (digits at {image_size}px, first time; cached after)" if progress else None
    stats = _from_features("digits", extractor.features_and_logits(images, progress=described)[0].cpu())
    save_torch(vars(stats), path)
    return stats


SCENES_REFERENCE = 10_000


def _scenes(extractor: FeatureExtractor, image_size: int, cache_dir: str | Path | None,
            progress: bool) -> ReferenceStats:  # fmt: skip
    from ditlab.data.scenes import SCENES_NAME, DigitScenes

    if image_size not in (32, 64):
        raise ValueError(f"the scenes reference is drawn at 32 or 64 px; the samples are {image_size} px")
    path = cache_root(cache_dir) / f"reference-{SCENES_NAME}-{image_size}-{extractor.fingerprint}.pt"
    if path.is_file():
        try:
            return ReferenceStats(**torch.load(path, map_location="cpu", weights_only=True))
        except Exception:  # rebuilt below
            pass
    images = DigitScenes("train", size=image_size, length=SCENES_REFERENCE).images(range(SCENES_REFERENCE))
    described = f"reference statistics ({SCENES_NAME} at {image_size}px, first time; cached after)" if progress else None
    stats = _from_features("scenes", extractor.features_and_logits(images, progress=described)[0].cpu())
    save_torch(vars(stats), path)
    return stats


def _from_npz(path: Path, extractor: FeatureExtractor, progress: bool) -> ReferenceStats:
    with np.load(path) as batch:
        keys = set(batch.files)
        if {"mu", "sigma"} <= keys and np.asarray(batch["mu"]).shape == (extractor.num_features,):
            num = int(batch["arr_0"].shape[0]) if "arr_0" in keys else None
            return ReferenceStats(str(path), torch.from_numpy(batch["mu"]).double(),
                                  torch.from_numpy(batch["sigma"]).double(), num)  # fmt: skip
        if "arr_0" not in keys:
            size = np.asarray(batch["mu"]).shape if "mu" in keys else "none"
            raise ValueError(f"reference {path} has no arr_0 images and its mu (shape {size}) does not fit "
                             f"{extractor.name} features ({extractor.num_features}); use the features it was made with")  # fmt: skip
        images = images_from_uint8(batch["arr_0"])
    described = f"reference statistics ({path.name})" if progress else None
    return _from_features(str(path), extractor.features_and_logits(images, progress=described)[0].cpu())


def _cleanfid(name: str, extractor: FeatureExtractor) -> ReferenceStats:
    import cleanfid

    path = (
        Path(name)
        if name.endswith(".npz")
        else Path(cleanfid.__file__).parent / "stats" / f"{name.lower()}.npz"
    )
    if not path.is_file():
        raise FileNotFoundError(f"clean-fid statistics {path} not found; copy {path.name} there (download it on a "
                                f"networked machine from {CLEANFID_STATS_URL}{path.name})")  # fmt: skip
    with np.load(path) as stats:
        mu, sigma = torch.from_numpy(stats["mu"]).double(), torch.from_numpy(stats["sigma"]).double()
    if mu.shape != (extractor.num_features,):
        raise ValueError(f"clean-fid statistics {path.name} hold {mu.shape[0]} features, {extractor.name} gives "
                         f"{extractor.num_features}; use --features inception-v3")  # fmt: skip
    return ReferenceStats(f"cleanfid:{path.stem}", mu, sigma, None)


_MEMORY: dict[tuple, ReferenceStats] = {}


def reference_stats(reference: str, extractor: FeatureExtractor, image_size: int = 16,
                    cache_dir: str | Path | None = None, progress: bool = False) -> ReferenceStats:  # fmt: skip
    """Statistics of ``reference`` in ``extractor``'s feature space (kept in memory per process); ``progress``
    reports the feature pass when the statistics are computed rather than read from the cache."""
    key = (reference, extractor.fingerprint, image_size, str(cache_dir))
    if key in _MEMORY:
        return _MEMORY[key]
    if reference == "digits":
        stats = _digits(extractor, image_size, cache_dir, progress)
    elif reference == "scenes":
        stats = _scenes(extractor, image_size, cache_dir, progress)
    elif reference.startswith("cleanfid:"):
        stats = _cleanfid(reference.split(":", 1)[1], extractor)
    elif reference.endswith(".npz"):
        path = Path(os.path.expanduser(reference))
        if not path.is_file():
            raise FileNotFoundError(f"reference batch {path} does not exist; pass an ADM-style .npz "
                                    "(mu/sigma or arr_0 images) or 'digits'")  # fmt: skip
        stats = _from_npz(path, extractor, progress)
    else:
        raise ValueError(
            f"unknown reference {reference!r}; use 'digits', 'scenes', a PATH.npz reference batch, or cleanfid:NAME"
        )
    _MEMORY[key] = stats
    return stats
