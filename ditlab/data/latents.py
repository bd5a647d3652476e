"""VAE latent pre-extraction (``ditlab encode``) and the datamodule that trains on the stored latents.

Encoding once instead of every step is fast-DiT's speed-up (0.43 -> 0.84 steps/s for DiT-XL/2); storing
the posterior mean and std and drawing ``mean + std * noise`` each time a latent is read is REPA/edm2's
fix for fast-DiT's single frozen sample, and the flipped image's latents keep DiT's (Peebles & Xie 2023)
random-flip augmentation alive. The format (``meta.json`` + shards) lives in :mod:`ditlab.data.shards`.

:class:`LatentDataModule` is map-style: each shard is memory-mapped by safetensors and one row is read per
item, so nothing is loaded up front, processes on one machine share the page cache, and Lightning's
distributed sampler shards the rows across GPUs. Batches are ``(latents: (B, C, h, w), labels: (B,))``,
already multiplied by the latent scale, so they feed :class:`~ditlab.methods.base.DiffusionModule` as
images would.

Text-to-image training reuses the same machinery: ``--text_encoder`` stores each row's caption features beside
it (:mod:`ditlab.data.text_shards`), and the batches become ``(x, labels, TextFeatures)``, so the frozen text
encoder runs once per caption at encode time instead of once per step. Sources without a VAE (the digit scenes,
trained in pixel space) are stored as pixels (``--vae none``), so they too are read from shards.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from ditlab.child_process import exit_with_parent
from ditlab.data import shards, text_shards
from ditlab.data.images import ImageFolderDataset, scan_image_folder
from ditlab.data.sampling import training_loader
from ditlab.data.vae import load_vae, vae_config, vae_identity, vae_latent_shape
from ditlab.models.text.features import TextFeatures
from ditlab.progress import TaskProgress

MODES = ("moments", "sample")
PIXELS = "pixels"
"""The mode of a folder encoded with ``--vae none``: rows are the images themselves (pixel-space training)."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------- sources
class TensorSource(Dataset):
    """Images already in memory, ``images: (N, C, S, S)`` in [-1, 1] (the digits, in tests)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str, class_names: list[str]) -> None:
        self.images, self.labels, self.source_name, self.class_names = images, labels, name, class_names
        self.channels = images.shape[1]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]

    def name(self, index: int) -> str:
        return f"{self.source_name}[{index}]"


def digits_source(image_size: int) -> TensorSource:
    from ditlab.data.digits import CLASS_NAMES, digits_tensors

    images, labels = digits_tensors(image_size)
    return TensorSource(images, labels, "digits", CLASS_NAMES)


def folder_source(root: str, image_size: int) -> ImageFolderDataset:
    """Every file of an ImageNet-layout folder, ADM centre-cropped, in sorted (class, path) order."""
    class_names, samples = scan_image_folder(root)
    source = ImageFolderDataset(samples, image_size, flip=False)
    source.source_name, source.class_names = str(Path(root).expanduser().resolve()), class_names
    return source


class ScenesSource(Dataset):
    """The digit scenes (:mod:`ditlab.data.scenes`) as an encode source: rendered images, first digits, captions.

    Spelt ``scenes[:SPLIT[:COUNT]]`` (``scenes``, ``scenes:validation``, ``scenes:train:5000``); the name it records
    (``digit-scenes-v1:train:5000``) carries the generator's version, so another generator is not mistaken for it.
    """

    channels = 3

    def __init__(self, split: str, image_size: int, length: int | None) -> None:
        from ditlab.data.scenes import CLASS_NAMES, SCENES_NAME, DigitScenes

        if image_size not in (32, 64):
            raise ValueError(f"the digit scenes render at 32 or 64 px, not {image_size}: pass --image-size 32 or 64")
        self.scenes = DigitScenes(split, image_size, length)
        self.source_name = f"{SCENES_NAME}:{split}:{len(self.scenes)}"
        self.class_names = list(CLASS_NAMES)

    def __len__(self) -> int:
        return len(self.scenes)

    def load(self, index: int) -> torch.Tensor:
        return self.scenes[index]["image"]

    def name(self, index: int) -> str:
        return f"{self.source_name}[{index}]"

    def label(self, index: int) -> int:
        return self.scenes.attributes([index])[0].digits[0]

    def captions(self, indices: list[int]) -> list[str]:
        return self.scenes.captions(indices)


def scenes_source(spec: str, image_size: int) -> ScenesSource:
    """``scenes[:SPLIT[:COUNT]]`` (or the recorded ``digit-scenes-vN:SPLIT:COUNT``) as a :class:`ScenesSource`."""
    from ditlab.data.scenes import SCENES_NAME

    head, *rest = spec.split(":")
    if head not in ("scenes", SCENES_NAME) or len(rest) > 2:
        raise ValueError(f"source {spec!r}: write the digit scenes as scenes[:SPLIT[:COUNT]] (e.g. scenes:train:5000)"
                         f"; this ditlab generates {SCENES_NAME}")  # fmt: skip
    split = rest[0] if rest else "train"
    if len(rest) == 2 and not rest[1].isdigit():
        raise ValueError(f"source {spec!r}: COUNT in scenes:SPLIT:COUNT must be a whole number, got {rest[1]!r}")
    return ScenesSource(split, image_size, int(rest[1]) if len(rest) == 2 else None)


def is_scenes(source: str) -> bool:
    return source.split(":")[0] == "scenes" or source.startswith("digit-scenes-v")


def open_source(source: str, image_size: int):
    """``digits``, ``scenes[:SPLIT[:COUNT]]`` or an ImageNet-layout folder (write ``./scenes`` for a folder of
    that name)."""
    if source == "digits":
        return digits_source(image_size)
    if is_scenes(source):
        return scenes_source(source, image_size)
    return folder_source(source, image_size)


def read_captions(source, indices: list[int]) -> list[str]:
    """The captions of ``indices``: the scenes' own, or a folder image's sidecar ``IMAGE.txt`` (stripped)."""
    if hasattr(source, "captions"):
        return source.captions(indices)
    if not hasattr(source, "samples"):
        raise ValueError(f"{source.source_name} has no captions; encode text from the digit scenes (scenes:SPLIT) or "
                         "an image folder with a caption IMAGE.txt next to each image")  # fmt: skip
    captions = []
    for index in indices:
        path = Path(source.samples[index][0]).with_suffix(".txt")
        if not path.is_file():
            raise FileNotFoundError(f"{source.samples[index][0]} has no caption file {path.name} beside it; add one per "
                                    "image and rerun the same command (finished shards are kept)")  # fmt: skip
        captions.append(path.read_text(encoding="utf-8").strip())
    return captions


def _labels(source, indices: list[int]) -> torch.Tensor:
    if hasattr(source, "label"):  # computed per row (the scenes: no table of every label up front)
        return torch.tensor([source.label(i) for i in indices], dtype=torch.long)
    return torch.as_tensor(source.labels)[torch.tensor(indices, dtype=torch.long)].long()


class _Indexed(Dataset):
    def __init__(self, source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return index, self.source.load(index)


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, list[int]]:
    """``(decoded indices, images (n, C, S, S) or None, unreadable indices)``."""
    good = [(index, image) for index, image in items if image is not None]
    images = torch.stack([image for _, image in good]) if good else None
    return [index for index, _ in good], images, [index for index, image in items if image is None]


# ----------------------------------------------------------------------------------------- encoding
@dataclass
class EncodeReport:
    folder: Path
    written: list[int] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    complete: bool = False


def _noise(shape: torch.Size, seed: int, index: int, flipped: bool) -> torch.Tensor:
    """Noise of image ``index``'s sample: its own stream, so batch size and ranks do not change it."""
    return torch.randn(
        shape, generator=torch.Generator().manual_seed(seed * 2**33 + 2 * index + int(flipped))
    )


@torch.no_grad()
def encode_batch(vae, images: torch.Tensor, indices: list[int], mode: str, flip: bool, seed: int,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:  # fmt: skip
    """``images: (n, C, S, S)`` -> ``{mean, std}`` or ``{latents}`` ``(n, c, h, w)``, plus ``flip_*``."""
    device = next(vae.parameters()).device
    images = images.to(device, torch.float32)
    if images.shape[1] == 1 and vae.config.in_channels == 3:
        images = images.expand(-1, 3, -1, -1)
    if flip:
        images = torch.cat([images, images.flip(-1)])
    posterior = vae.encode(images).latent_dist
    mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
    tensors = {}
    for prefix, part in [("", slice(0, len(indices))), ("flip_", slice(len(indices), None))][: 1 + flip]:
        if mode == "moments":
            tensors[prefix + "mean"], tensors[prefix + "std"] = mean[part].to(dtype), std[part].to(dtype)
        else:
            noise = torch.stack([_noise(mean.shape[1:], seed, i, prefix == "flip_") for i in indices])
            tensors[prefix + "latents"] = (mean[part] + std[part] * noise).to(dtype)
    return tensors


def encode_to_shards(source, out: str | Path, vae: str | None, image_size: int, *, shard_size: int = 1024,
                     batch_size: int = 64, mode: str = "moments", flip: bool = False, dtype: str = "float32",
                     seed: int = 0, rank: int = 0, world_size: int = 1, device: str = "cpu",
                     num_workers: int = 0, progress: bool = True, text_encoder: str | None = None,
                     text_encoder_options: dict | None = None, encoder: str | None = None) -> EncodeReport:  # fmt: skip
    """Encode this rank's unfinished shards of ``source`` into ``out``; finished shards are left as they are.

    ``source`` has ``len``, ``load(i) -> (C, S, S) | None``, ``name(i)``, ``labels`` (or ``label(i)``),
    ``class_names`` and ``source_name`` (see :func:`open_source`). ``vae`` None stores the images themselves (mode
    ``pixels``). ``text_encoder`` also stores each row's caption features (:func:`read_captions`) and the empty
    caption's, as :mod:`ditlab.data.text_shards` describes. ``encoder`` (an RAE folder, :mod:`ditlab.methods.rae`) stores
    its standardised latents in place of a VAE's: one deterministic sample per image (mode ``sample``), scale 1.
    """
    if mode not in MODES or dtype not in DTYPES:
        raise ValueError(
            f"mode {mode!r} / dtype {dtype!r}: choose a mode in {MODES} and a dtype in {list(DTYPES)}"
        )
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard size {shard_size} and batch size {batch_size} must be at least 1")
    if text_encoder_options and not text_encoder:
        raise ValueError("--text_encoder_options without --text_encoder: name the text encoder they are for")
    if text_encoder and flip:
        raise ValueError("--flip with --text_encoder: a mirrored image contradicts captions that say left or right "
                         "(the digit scenes' relations); drop --flip")  # fmt: skip
    if encoder is not None and vae is not None:
        raise ValueError("--encoder with --vae: an RAE's encoder replaces the VAE; pass one of them")
    if vae is None and encoder is None and flip:
        raise ValueError("--flip with --vae none: pixels need no stored mirror image (the datamodule mirrors them on "
                         "read); drop --flip")  # fmt: skip
    out = Path(out).expanduser()
    ranges = shards.shard_ranges(len(source), shard_size)
    rae = None
    if encoder is not None:
        from ditlab.methods.rae import load_rae

        rae = load_rae(encoder)
        if rae.image_size != image_size:
            raise ValueError(f"the RAE {encoder} encodes {rae.image_size}px images; pass --image-size {rae.image_size}")
        mode = "sample"  # the encoder is deterministic: its latents are the one sample (std 0)
        meta = {"format": shards.FORMAT, "vae": rae.identity(), "latent_shape": list(rae.latent_shape),
                "scaling_factor": 1.0, "shift_factor": None}  # fmt: skip
    elif vae is None:
        mode, seed, shape = PIXELS, None, [getattr(source, "channels", 3), image_size, image_size]
        meta = {"format": shards.FORMAT, "vae": None, "latent_shape": shape, "scaling_factor": 1.0,
                "shift_factor": None}  # fmt: skip
    else:
        config = vae_config(vae)
        meta = {
            "format": shards.FORMAT, "vae": vae_identity(vae), "latent_shape": list(vae_latent_shape(vae, image_size)),
            "scaling_factor": config.get("scaling_factor", 0.18215), "shift_factor": config.get("shift_factor"),
        }  # fmt: skip
    meta.update({
        "image_size": image_size, "mode": mode, "flip": flip, "dtype": dtype, "shard_size": shard_size,
        "num_shards": len(ranges), "num_images": len(source), "source": source.source_name,
        "class_names": list(source.class_names), "seed": seed if mode == "sample" else None,
    })  # fmt: skip
    text = None
    if text_encoder:
        if not hasattr(source, "captions") and not hasattr(source, "samples"):
            read_captions(source, [])  # the one-line "has no captions"
        encoder, null = text_shards.build_encoder(text_encoder, text_encoder_options, device)
        text = meta["text"] = text_shards.text_meta(text_encoder, text_encoder_options, null)
    meta["fingerprint"] = shards.fingerprint(meta)
    shards.write_meta(out, meta)
    if text is not None:
        text_shards.write_null(out, null, DTYPES[dtype], text)

    report = EncodeReport(out)
    pending = []
    for index in shards.owned_shards(len(ranges), rank, world_size):
        path = shards.shard_path(out, index)
        (report.already_done if path.is_file() else pending).append(index)
        shards.remove_partial(path)
    batches = [(index, list(ranges[index][start : start + batch_size]))
               for index in pending for start in range(0, len(ranges[index]), batch_size)]  # fmt: skip
    if batches:
        model = rae.to(device) if rae is not None else load_vae(vae).to(device) if vae is not None else None
        loader = DataLoader(_Indexed(source), batch_sampler=[chunk for _, chunk in batches], collate_fn=_collate,
                            num_workers=num_workers, worker_init_fn=exit_with_parent)  # fmt: skip
        total = sum(len(chunk) for _, chunk in batches)
        parts: dict[str, list[torch.Tensor]] = {}
        kept: list[int] = []
        skipped: list[int] = []
        with TaskProgress(f"encode rank {rank}/{world_size}", total, enabled=progress) as bar:
            for position, (indices, images, unreadable) in enumerate(loader):
                index = batches[position][0]
                if images is not None:
                    if model is None:
                        encoded = {PIXELS: images.to(DTYPES[dtype])}
                    else:
                        encoded = encode_batch(model, images, indices, mode, flip, seed, DTYPES[dtype])
                    if text is not None:
                        features = encoder(read_captions(source, indices))
                        encoded |= text_shards.feature_tensors(features, text, DTYPES[dtype], text_encoder)
                    for name, value in encoded.items():
                        parts.setdefault(name, []).append(value)
                kept += indices
                skipped += unreadable
                bar.advance(len(indices) + len(unreadable))
                if position + 1 < len(batches) and batches[position + 1][0] == index:
                    continue
                _write(out, index, parts, kept, skipped, source, meta)
                report.written.append(index)
                report.skipped_files += [source.name(i) for i in skipped]
                parts, kept, skipped = {}, [], []
    report.complete = all(shards.shard_path(out, index).is_file() for index in range(len(ranges)))
    return report


def _write(
    out: Path, index: int, parts: dict, kept: list[int], skipped: list[int], source, meta: dict
) -> None:
    channels, height, width = meta["latent_shape"]
    dtype = DTYPES[meta["dtype"]]
    names = {"moments": ("mean", "std"), "sample": ("latents",), PIXELS: (PIXELS,)}[meta["mode"]]
    names = [prefix + name for prefix in ("", "flip_")[: 1 + meta["flip"]] for name in names]
    empty = {name: torch.zeros(0, channels, height, width, dtype=dtype) for name in names}
    if meta.get("text"):
        empty |= text_shards.empty_tensors(meta["text"], dtype)
    tensors = {name: torch.cat(parts[name]) if name in parts else value for name, value in empty.items()}
    tensors["indices"] = torch.tensor(kept, dtype=torch.long)
    tensors["labels"] = _labels(source, kept)
    metadata = {"fingerprint": meta["fingerprint"], "skipped": json.dumps(skipped),
                "skipped_files": json.dumps([source.name(i) for i in skipped])}  # fmt: skip
    shards.save_shard(shards.shard_path(out, index), tensors, metadata)


# ----------------------------------------------------------------------------------------- training
class LatentDataset(Dataset):
    """``(latents: (C, h, w) float32, label)`` per stored row; ``rows`` picks a subset of the folder's rows.

    With moments, ``sample_posterior`` draws ``mean + std * noise`` on every read (else the mean);
    ``flip`` reads the flipped image's latents with probability 1/2. Latents are multiplied by ``scale``.
    With ``pixels`` (a source with ``load(i)``, and ``indices``: each row's index in it) an item is
    ``(latents, label, image (C, S, S) in [-1, 1])``: the clean image the latents were encoded from, flipped
    with them, for an alignment encoder (REPA and its family feed the encoder pixels, never latents).
    Mode ``pixels`` (``--vae none``) reads the stored image, mirrored on read when ``flip`` says so. With ``text``
    an item is ``(x, label, (tokens (L, D), pooled (P,), mask (L,) bool))``, the row's caption features, which
    :class:`~ditlab.data.text_shards.TextCollate` batches into one ``TextFeatures``.
    """

    def __init__(self, paths: list[Path], counts: list[int], labels: torch.Tensor, rows: torch.Tensor, mode: str,
                 scale: float, sample_posterior: bool, flip: bool, pixels=None,
                 indices: torch.Tensor | None = None, text: bool = False) -> None:  # fmt: skip
        self.paths, self.labels, self.rows, self.mode = paths, labels, rows, mode
        self.starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
        self.scale, self.sample_posterior, self.flip = scale, sample_posterior, flip
        self.pixels, self.indices, self.text = pixels, indices, text
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def _handle(self, shard: int):
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own maps
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.paths[shard]), "pt")
        return self._handles[shard]

    def __getitem__(self, index: int) -> tuple:
        row = int(self.rows[index])
        shard = bisect.bisect_right(self.starts, row) - 1
        local, handle = row - self.starts[shard], self._handle(shard)
        prefix = "flip_" if self.flip and torch.rand(()) < 0.5 else ""
        if self.mode == PIXELS:
            latents = handle.get_slice(PIXELS)[local].float()
            latents = latents.flip(-1) if prefix else latents
        elif self.mode == "sample":
            latents = handle.get_slice(prefix + "latents")[local].float()
        elif self.sample_posterior:
            mean, std = (handle.get_slice(prefix + name)[local].float() for name in ("mean", "std"))
            latents = mean + std * torch.randn_like(mean)
        else:
            latents = handle.get_slice(prefix + "mean")[local].float()
        if self.text:
            return latents * self.scale, int(self.labels[row]), text_shards.read_row(handle, local)
        if self.pixels is None:
            return latents * self.scale, int(self.labels[row])
        image = self.pixels.load(int(self.indices[row]))
        if image is None:
            raise FileNotFoundError(f"{self.pixels.name(int(self.indices[row]))}: the image of latent row {row} no "
                                    "longer reads; re-encode the folder or set data.pixels_root to its images")  # fmt: skip
        return latents * self.scale, int(self.labels[row]), image.flip(-1) if prefix else image


@dataclass
class _Folder:
    """An opened shard folder: ``counts[k]`` rows in shard ``k``, ``labels: (rows,)`` in row order."""

    meta: dict
    paths: list[Path]
    counts: list[int]
    labels: torch.Tensor
    indices: torch.Tensor
    """Each row's index in the encoded source (its image, for ``pixels``)."""
    null: TextFeatures | None = None
    """The empty caption's features, when the folder holds text."""


class LatentDataModule(L.LightningDataModule):
    """Trains on a ``ditlab encode`` folder; map-style over memory-mapped shards (see the module docstring).

    Args:
        root: the shard folder (``meta.json`` + ``shard-*.safetensors``).
        vae: the VAE folder the model decodes with; checked against the one the shards were encoded with.
        latent_size: expected latent side (32 for 256x256 images and SD-VAE); checked against the shards.
        latent_scale: multiplier for the stored latents; None takes the VAE's ``scaling_factor`` from meta.json.
        sample_posterior: draw ``mean + std * noise`` on every read (moments shards), else use the mean.
        flip: use the flipped image's latents half of the time (shards encoded with ``--flip``; pixel shards are
            mirrored on read). Default: on, except for shards with text (a mirror contradicts "left of").
        val_root: a second shard folder for validation; else ``val_fraction`` of ``root``'s rows (0: none).
        pixels: batches are ``(latents, labels, images)``: each latent's clean image re-read from the source the
            shards were encoded from (``meta.json``'s ``source``, centre-cropped to its ``image_size``), for an
            alignment encoder (REPA, HASTE, REG).
        pixels_root: where that source's images are now, when they moved since encoding.

    Shards encoded with ``--text_encoder`` give ``(x, labels, TextFeatures)`` batches (the stored caption features,
    ``null`` set to the stored empty caption's), so a text-conditioned network trains without running its encoder;
    a network whose ``condition_options`` name another encoder (or widths) is refused when the trainer asks for
    the loaders (:func:`~ditlab.data.text_shards.check_network`). Shards encoded with ``--vae none`` hold pixels.
    """

    def __init__(self, root: str, vae: str | None = None, latent_size: int | None = None,
                 latent_scale: float | None = None, sample_posterior: bool = True, flip: bool | None = None,
                 batch_size: int = 256, val_root: str | None = None, val_fraction: float = 0.0,
                 split_seed: int = 0, num_workers: int = 4, pixels: bool = False,
                 pixels_root: str | None = None) -> None:  # fmt: skip
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} is out of range; choose a value in [0, 1)")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be at least 1")
        self.save_hyperparameters()
        self.root, self.vae, self.latent_size, self.latent_scale = root, vae, latent_size, latent_scale
        self.sample_posterior, self.flip, self.batch_size = sample_posterior, flip, batch_size
        self.val_root, self.val_fraction = val_root, val_fraction
        self.split_seed, self.num_workers = split_seed, num_workers
        self.pixels, self.pixels_root = pixels, pixels_root
        self._meta: dict | None = None
        self.train_set: LatentDataset | None = None
        self.val_set: LatentDataset | None = None
        self._collate: text_shards.TextCollate | None = None
        self.skipped_files: list[str] = []
        """Images the encoder could not read (they have no latents); ``skipped`` counts them."""

    @property
    def meta(self) -> dict:
        if self._meta is None:
            meta = shards.read_meta(Path(self.root).expanduser())
            if meta is None:
                raise FileNotFoundError(f"data.root {self.root} has no {shards.META}; create it with "
                                        f"`ditlab encode IMAGE_FOLDER --out {self.root}`")  # fmt: skip
            self._meta = meta
        return self._meta

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def channels(self) -> int:
        return self.meta["latent_shape"][0]

    @property
    def skipped(self) -> int:
        """Images the encoder could not read; for the run summary."""
        return len(self.skipped_files)

    @property
    def scale(self) -> float:
        """The multiplier applied to stored latents (config value, else the VAE's scaling factor)."""
        return self.latent_scale if self.latent_scale is not None else self.meta["scaling_factor"]

    @property
    def text(self) -> dict | None:
        """``meta.json``'s ``text`` entry (encoder kind, options, widths), None for shards without captions."""
        return self.meta.get("text")

    @property
    def text_null(self) -> TextFeatures:
        """The stored empty caption's features ``(1, L, D)``: the null condition of every text batch."""
        if self.text is None:
            raise ValueError(f"data.root {self.root} holds no text features (encoded without --text_encoder)")
        return text_shards.read_null(Path(self.root).expanduser(), self.text)

    def _flips(self, meta: dict) -> bool:
        return (meta.get("text") is None) if self.flip is None else self.flip

    def _check(self, meta: dict, folder: str) -> None:
        if self.vae is not None and meta["vae"] is None:
            raise ValueError(f"latent folder {folder} holds pixels (encoded with --vae none), but data.vae is "
                             f"{self.vae}; drop data.vae (and the model's vae) to train in pixel space")  # fmt: skip
        if self.vae is not None:
            wanted = {
                "vae": vae_identity(self.vae),
                "latent_shape": list(vae_latent_shape(self.vae, meta["image_size"])),
            }
            if not shards.same_vae(meta, wanted):
                raise ValueError(f"latent folder {folder} holds latents of {shards.describe_vae(meta)}, but data.vae "
                                 f"is {shards.describe_vae(wanted)}; point data.vae at the encoding VAE or re-encode")  # fmt: skip
        if self.latent_size is not None and meta["latent_shape"][1:] != [self.latent_size] * 2:
            shape = "x".join(map(str, meta["latent_shape"]))
            raise ValueError(f"latent folder {folder} holds {shape} latents ({meta['image_size']}px images), but "
                             f"data.latent_size={self.latent_size}; encode at the matching image size or fix the config")  # fmt: skip
        if self.flip and meta.get("text") is not None:
            raise ValueError(f"latent folder {folder} holds captions: a mirrored image contradicts captions that say "
                             "left or right; set data.flip false (or leave it unset)")  # fmt: skip
        if self._flips(meta) and not meta["flip"] and meta["mode"] != PIXELS:
            raise ValueError(
                f"latent folder {folder} has no flipped latents: set data.flip false, or encode with --flip"
            )
        if self.pixels and meta.get("text") is not None:
            raise ValueError(f"data.pixels with text shards ({folder}) is not supported: their batches carry "
                             "(x, labels, TextFeatures); set data.pixels false")  # fmt: skip
        if self.sample_posterior and meta["mode"] == "sample":
            raise ValueError(f"latent folder {folder} stores one posterior sample (--mode sample), not mean and std: "
                             f"set data.sample_posterior false, or encode with --mode moments")  # fmt: skip

    def _open(self, folder: str) -> _Folder:
        meta, paths, headers = shards.open_folder(folder)
        self._check(meta, folder)
        self.skipped_files += [name for header in headers for name in header["skipped_files"]]
        labels, indices = [], []
        for path in paths:
            with safe_open(str(path), "pt") as handle:
                labels.append(handle.get_tensor("labels"))
                indices.append(handle.get_tensor("indices"))
        null = text_shards.read_null(Path(folder).expanduser(), meta["text"]) if meta.get("text") else None
        return _Folder(meta, paths, [header["rows"] for header in headers], torch.cat(labels), torch.cat(indices),
                       null)  # fmt: skip

    def pixel_source(self, meta: dict, folder: str):
        """The images ``folder``'s latents were encoded from, in the encoder's order (``pixels``)."""
        if meta["source"] == "digits" or is_scenes(meta["source"]):
            source = open_source(meta["source"], meta["image_size"])
        else:
            root = Path(self.pixels_root or meta["source"]).expanduser()
            if not root.is_dir():
                raise FileNotFoundError(f"data.pixels: the images of {folder} were encoded from {meta['source']}, which "
                                        "does not exist here; set data.pixels_root to their folder")  # fmt: skip
            source = folder_source(str(root), meta["image_size"])
        if len(source) != meta["num_images"]:
            raise ValueError(f"data.pixels: {folder} was encoded from {meta['num_images']} images but "
                             f"{source.source_name} now holds {len(source)}; point data.pixels_root at the encoded "
                             "images or re-encode")  # fmt: skip
        return source

    def _dataset(self, folder: _Folder, rows: torch.Tensor, train: bool) -> LatentDataset:
        """Training reads resample and flip; validation reads the unflipped mean (a deterministic loss)."""
        pixels = self.pixel_source(folder.meta, str(folder.paths[0].parent)) if self.pixels else None
        return LatentDataset(folder.paths, folder.counts, folder.labels, rows, folder.meta["mode"], self.scale,
                             self.sample_posterior and train, self._flips(folder.meta) and train, pixels,
                             folder.indices, text=folder.null is not None)  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.skipped_files = []
        train = self._open(self.root)
        self._meta = train.meta
        if self.val_root is not None:
            val = self._open(self.val_root)
            if not shards.same_vae(val.meta, train.meta):
                raise ValueError(f"data.val_root {self.val_root} was encoded with {shards.describe_vae(val.meta)}, "
                                 f"data.root with {shards.describe_vae(train.meta)}; encode both with the same VAE")  # fmt: skip
            if val.meta.get("text") != train.meta.get("text"):
                raise ValueError(f"data.val_root {self.val_root} holds text features {val.meta.get('text')}, data.root "
                                 f"{train.meta.get('text')}; encode both with the same --text_encoder")  # fmt: skip
            train_rows, val_rows = torch.arange(len(train.labels)), torch.arange(len(val.labels))
        else:
            order = torch.randperm(
                len(train.labels), generator=torch.Generator().manual_seed(self.split_seed)
            )
            num_val = int(round(self.val_fraction * len(train.labels)))
            val, train_rows, val_rows = train, order[num_val:].sort().values, order[:num_val].sort().values
        if self.batch_size > len(train_rows):
            raise ValueError(f"data.batch_size={self.batch_size} is larger than the training latents in {self.root} "
                             f"({len(train_rows)}); use a batch size of at most {len(train_rows)}")  # fmt: skip
        self.train_set = self._dataset(train, train_rows, train=True)
        self.val_set = self._dataset(val, val_rows, train=False)
        self._collate = text_shards.TextCollate(train.null) if train.null is not None else None
        self.check_network()

    def check_network(self, config=None) -> None:
        """Refuse a text-conditioned network (``config``, default: the attached trainer's module's network) that
        does not read the stored text features; run at setup and again when the loaders are made (a module that
        builds its network in ``configure_model`` has one by then)."""
        if config is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            config = getattr(getattr(module, "network", None), "config", None)
        if config is not None:
            text_shards.check_network(config, self.meta.get("text"), self.root)

    def _options(self) -> dict:
        return {} if self._collate is None else {"collate_fn": self._collate}

    def train_dataloader(self) -> DataLoader:
        self.check_network()
        return training_loader(self.train_set, self.batch_size, torch.initial_seed() % 2**62, self.trainer,
                               self.num_workers, **self._options())  # fmt: skip

    def val_dataloader(self) -> DataLoader | list:
        self.check_network()
        if not len(self.val_set):
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers, **self._options())
