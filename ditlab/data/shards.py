"""The on-disk format of pre-extracted VAE latents: ``meta.json`` plus ``shard-KKKKK.safetensors`` files.

Pre-extraction follows fast-DiT (encode once, train on latents) with the fixes its issues asked for and
REPA/edm2's choice of storing the posterior moments instead of one frozen sample. Shard ``k`` holds the
images with dataset indices ``[k * shard_size, (k + 1) * shard_size)`` that could be decoded:

- ``mean``, ``std``: ``(n, C, h, w)`` posterior moments (mode ``moments``), or ``latents`` (mode ``sample``);
- ``flip_mean``, ``flip_std`` / ``flip_latents``: the same for the horizontally flipped image, when asked;
- RAE latents (``--encoder RAE_FOLDER``): ``latents`` (mode ``sample``), the encoder's standardised tokens;
  ``meta.json``'s ``vae`` is the RAE's identity with ``kind: rae``;
- ``pixels``: ``(n, C, S, S)`` images in [-1, 1] instead, for a source trained in pixel space (``--vae none``,
  mode ``pixels``: ``meta.json``'s ``vae`` is null and ``latent_shape`` the image's);
- ``text_tokens``, ``text_pooled``, ``text_mask``: each row's caption features, when encoded with ``--text_encoder``
  (plus ``text-null.safetensors`` and ``meta.json``'s ``text``: :mod:`ditlab.data.text_shards`);
- ``labels``, ``indices``: ``(n,)`` int64; the safetensors metadata lists the skipped indices and files.

A shard is written atomically (:mod:`ditlab.atomic`: a temporary sibling moved into place), so a shard file that
exists is complete and a full disk is one line; process ``rank`` of ``world_size`` owns shards
``k % world_size == rank``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ditlab.atomic import DiskFull, save_bytes, save_json, temporaries

FORMAT = "ditlab-latents/1"
META = "meta.json"
# meta.json keys a resumed run must agree on (besides the VAE), and the options that set them
MATCHED = {"image_size": "--image-size", "mode": "--mode", "flip": "--flip", "dtype": "--dtype",
           "shard_size": "--shard-size", "source": "SOURCE", "num_images": "SOURCE", "seed": "--seed",
           "text": "--text_encoder/--text_encoder_options"}  # fmt: skip


def shard_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.safetensors"


def shard_ranges(num_images: int, shard_size: int) -> list[range]:
    """Dataset indices of every shard: ``[range(0, N), range(N, 2N), ...]``."""
    return [range(start, min(start + shard_size, num_images)) for start in range(0, num_images, shard_size)]


def owned_shards(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards process ``rank`` writes; disjoint across ranks and together all of them."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}; use 0 <= rank < world_size")
    return list(range(rank, num_shards, world_size))


def fingerprint(meta: dict) -> str:
    """Hash of everything that makes shards interchangeable (the VAE's path on this machine excluded)."""
    content = {key: value for key, value in meta.items() if key != "fingerprint"}
    if meta["vae"] is not None:  # None: pixels (``--vae none``)
        content["vae"] = {key: value for key, value in meta["vae"].items() if key != "path"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def describe_vae(meta: dict) -> str:
    vae = meta["vae"]
    shape = "x".join(str(size) for size in meta["latent_shape"])
    if vae is None:
        return f"no VAE (pixels {shape}, --vae none)"
    if vae.get("kind") == "rae":
        return f"RAE {vae['path']} (config {vae['config_hash']}, weights {vae['weights_hash']}, latents {shape})"
    return f"VAE {vae['path']} (config {vae['config_hash']}, weights {vae['weights_hash']}, latents {shape})"


def read_meta(folder: str | Path) -> dict | None:
    path = Path(folder) / META
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a ditlab latent folder (format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    return meta


def same_vae(first: dict, second: dict) -> bool:
    """Same VAE config, weights and latent shape (the folder path may differ between machines)."""
    keys = ("config_hash", "weights_hash")
    if first["vae"] is None or second["vae"] is None:  # pixels: the same only as other pixels of that shape
        return first["vae"] is second["vae"] and first["latent_shape"] == second["latent_shape"]
    return first["latent_shape"] == second["latent_shape"] and all(
        first["vae"][k] == second["vae"][k] for k in keys
    )


def check_same(existing: dict, wanted: dict, folder: str | Path) -> None:
    """Refuse to add to (or train from) a folder written with another VAE, latent size or options."""
    if not same_vae(existing, wanted):
        raise ValueError(f"shard folder {folder} holds latents of {describe_vae(existing)}, but this run uses "
                         f"{describe_vae(wanted)}; choose another folder or delete {folder}")  # fmt: skip
    differ = [key for key in MATCHED if existing.get(key) != wanted.get(key)]
    if differ:
        was = ", ".join(f"{key}={existing.get(key)!r}" for key in differ)
        now = ", ".join(f"{key}={wanted.get(key)!r}" for key in differ)
        options = ", ".join(sorted({MATCHED[key] for key in differ}))
        raise ValueError(f"shard folder {folder} was written with {was}; this run asks {now}: rerun with the "
                         f"original {options} or choose another folder")  # fmt: skip


def write_meta(folder: str | Path, meta: dict) -> None:
    """Create or confirm ``meta.json``; every rank may call this (same content, atomic replace)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = read_meta(folder)
    if existing is not None:
        check_same(existing, meta, folder)
        return
    save_json(meta, folder / META, indent=2)


def save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The shard appears complete or not at all (serialised in memory: a shard is small); out of space, the
    error names the complete shards, which a rerun keeps."""
    try:
        save_bytes(save({name: value.contiguous() for name, value in tensors.items()}, metadata=metadata), path)
    except DiskFull as full:
        full.saved.append(f"{len(list(path.parent.glob('shard-*.safetensors')))} complete shards in {path.parent}")
        full.hint = "free some space and rerun the same `ditlab encode` command: it keeps the complete shards"
        raise


def remove_partial(path: Path) -> None:
    """Delete temporary files a killed run left for shard ``path``."""
    for temporary in temporaries(path):
        temporary.unlink(missing_ok=True)


def shard_header(path: Path) -> dict:
    """A shard's metadata and row count, read from its header only."""
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
        rows = handle.get_slice("labels").get_shape()[0]
    return {"rows": rows, "fingerprint": metadata.get("fingerprint"),
            "skipped": json.loads(metadata.get("skipped", "[]")),
            "skipped_files": json.loads(metadata.get("skipped_files", "[]"))}  # fmt: skip


def open_folder(folder: str | Path) -> tuple[dict, list[Path], list[dict]]:
    """``(meta, shard paths, shard headers)`` of a complete shard folder; a clear error otherwise."""
    folder = Path(folder).expanduser()
    meta = read_meta(folder)
    if meta is None:
        raise FileNotFoundError(f"latent folder {folder} has no {META}; create it with "
                                f"`ditlab encode IMAGE_FOLDER --out {folder}`")  # fmt: skip
    paths = [shard_path(folder, index) for index in range(meta["num_shards"])]
    missing = [index for index, path in enumerate(paths) if not path.is_file()]
    if missing:
        shown = ", ".join(str(index) for index in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise FileNotFoundError(f"latent folder {folder} is incomplete: {len(missing)} of {meta['num_shards']} "
                                f"shards missing ({shown}); rerun the same `ditlab encode` command to finish it")  # fmt: skip
    headers = [shard_header(path) for path in paths]
    stale = [
        path.name for path, header in zip(paths, headers) if header["fingerprint"] != meta["fingerprint"]
    ]
    if stale:
        raise ValueError(f"latent folder {folder}: {', '.join(stale[:4])} were written by another encode run "
                         f"than {META} describes; delete them and rerun `ditlab encode`")  # fmt: skip
    return meta, paths, headers
