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
from ditlab.data import shards
from ditlab.data.images import ImageFolderDataset, scan_image_folder
from ditlab.data.sampling import training_loader
from ditlab.data.vae import load_vae, vae_config, vae_identity, vae_latent_shape
from ditlab.progress import TaskProgress

MODES = ("moments", "sample")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------- sources
class TensorSource(Dataset):
    """Images already in memory, ``images: (N, C, S, S)`` in [-1, 1] (the digits, in tests)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str, class_names: list[str]) -> None:
        self.images, self.labels, self.source_name, self.class_names = images, labels, name, class_names

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


def encode_to_shards(source, out: str | Path, vae: str, image_size: int, *, shard_size: int = 1024,
                     batch_size: int = 64, mode: str = "moments", flip: bool = False, dtype: str = "float32",
                     seed: int = 0, rank: int = 0, world_size: int = 1, device: str = "cpu",
                     num_workers: int = 0, progress: bool = True) -> EncodeReport:  # fmt: skip
    """Encode this rank's unfinished shards of ``source`` into ``out``; finished shards are left as they are.

    ``source`` has ``len``, ``load(i) -> (C, S, S) | None``, ``name(i)``, ``labels``, ``class_names`` and
    ``source_name`` (see :func:`folder_source`, :func:`digits_source`).
    """
    if mode not in MODES or dtype not in DTYPES:
        raise ValueError(
            f"mode {mode!r} / dtype {dtype!r}: choose a mode in {MODES} and a dtype in {list(DTYPES)}"
        )
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard size {shard_size} and batch size {batch_size} must be at least 1")
    out = Path(out).expanduser()
    ranges = shards.shard_ranges(len(source), shard_size)
    config = vae_config(vae)
    meta = {
        "format": shards.FORMAT, "vae": vae_identity(vae), "latent_shape": list(vae_latent_shape(vae, image_size)),
        "scaling_factor": config.get("scaling_factor", 0.18215), "shift_factor": config.get("shift_factor"),
        "image_size": image_size, "mode": mode, "flip": flip, "dtype": dtype, "shard_size": shard_size,
        "num_shards": len(ranges), "num_images": len(source), "source": source.source_name,
        "class_names": list(source.class_names), "seed": seed if mode == "sample" else None,
    }  # fmt: skip
    meta["fingerprint"] = shards.fingerprint(meta)
    shards.write_meta(out, meta)

    report = EncodeReport(out)
    pending = []
    for index in shards.owned_shards(len(ranges), rank, world_size):
        path = shards.shard_path(out, index)
        (report.already_done if path.is_file() else pending).append(index)
        shards.remove_partial(path)
    batches = [(index, list(ranges[index][start : start + batch_size]))
               for index in pending for start in range(0, len(ranges[index]), batch_size)]  # fmt: skip
    if batches:
        model = load_vae(vae).to(device)
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
                    encoded = encode_batch(model, images, indices, mode, flip, seed, DTYPES[dtype])
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
    names = ("mean", "std") if meta["mode"] == "moments" else ("latents",)
    names = [prefix + name for prefix in ("", "flip_")[: 1 + meta["flip"]] for name in names]
    empty = torch.zeros(0, channels, height, width, dtype=DTYPES[meta["dtype"]])
    tensors = {name: torch.cat(parts[name]) if name in parts else empty for name in names}
    tensors["indices"] = torch.tensor(kept, dtype=torch.long)
    tensors["labels"] = torch.as_tensor(source.labels)[tensors["indices"]].long()
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
    """

    def __init__(self, paths: list[Path], counts: list[int], labels: torch.Tensor, rows: torch.Tensor, mode: str,
                 scale: float, sample_posterior: bool, flip: bool, pixels=None,
                 indices: torch.Tensor | None = None) -> None:  # fmt: skip
        self.paths, self.labels, self.rows, self.mode = paths, labels, rows, mode
        self.starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
        self.scale, self.sample_posterior, self.flip = scale, sample_posterior, flip
        self.pixels, self.indices = pixels, indices
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
        if self.mode == "sample":
            latents = handle.get_slice(prefix + "latents")[local].float()
        elif self.sample_posterior:
            mean, std = (handle.get_slice(prefix + name)[local].float() for name in ("mean", "std"))
            latents = mean + std * torch.randn_like(mean)
        else:
            latents = handle.get_slice(prefix + "mean")[local].float()
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


class LatentDataModule(L.LightningDataModule):
    """Trains on a ``ditlab encode`` folder; map-style over memory-mapped shards (see the module docstring).

    Args:
        root: the shard folder (``meta.json`` + ``shard-*.safetensors``).
        vae: the VAE folder the model decodes with; checked against the one the shards were encoded with.
        latent_size: expected latent side (32 for 256x256 images and SD-VAE); checked against the shards.
        latent_scale: multiplier for the stored latents; None takes the VAE's ``scaling_factor`` from meta.json.
        sample_posterior: draw ``mean + std * noise`` on every read (moments shards), else use the mean.
        flip: use the flipped image's latents half of the time (shards encoded with ``--flip``).
        val_root: a second shard folder for validation; else ``val_fraction`` of ``root``'s rows (0: none).
        pixels: batches are ``(latents, labels, images)``: each latent's clean image re-read from the source the
            shards were encoded from (``meta.json``'s ``source``, centre-cropped to its ``image_size``), for an
            alignment encoder (REPA, HASTE, REG).
        pixels_root: where that source's images are now, when they moved since encoding.
    """

    def __init__(self, root: str, vae: str | None = None, latent_size: int | None = None,
                 latent_scale: float | None = None, sample_posterior: bool = True, flip: bool = True,
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

    def _check(self, meta: dict, folder: str) -> None:
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
        if self.flip and not meta["flip"]:
            raise ValueError(
                f"latent folder {folder} has no flipped latents: set data.flip false, or encode with --flip"
            )
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
        return _Folder(meta, paths, [header["rows"] for header in headers], torch.cat(labels), torch.cat(indices))

    def pixel_source(self, meta: dict, folder: str):
        """The images ``folder``'s latents were encoded from, in the encoder's order (``pixels``)."""
        if meta["source"] == "digits":
            source = digits_source(meta["image_size"])
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
                             self.sample_posterior and train, self.flip and train, pixels, folder.indices)  # fmt: skip

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

    def train_dataloader(self) -> DataLoader:
        return training_loader(self.train_set, self.batch_size, torch.initial_seed() % 2**62, self.trainer,
                               self.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader | list:
        if not len(self.val_set):
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)
