"""``ditlab encode SOURCE --out DIR``: pre-extract VAE latents (or pixels) and caption features to shards.

Stores the posterior mean and std (REPA/edm2) or one sample, optionally the flipped image's latents too,
in ``shard-KKKKK.safetensors`` files of ``--shard-size`` images plus a ``meta.json`` (fast-DiT-style
pre-extraction, made resumable and multi-process). Rerunning the same command resumes: finished shards
are kept, a shard cut off mid-write is redone. Several processes split the shards by rank:

    torchrun --nproc_per_node 8 -m ditlab encode /data/imagenet/train --out /data/in256-latents --flip

``--text_encoder NAME`` (a registered text-encoder kind, ``--text_encoder_options`` its keyword options as JSON) also
stores each image's caption features and, once, the empty caption's (:mod:`ditlab.data.text_shards`), so a
text-conditioned network trains on them without running its frozen encoder. Captions come from the digit scenes
(SOURCE ``scenes[:SPLIT[:COUNT]]``) or, for an image folder, from a ``IMAGE.txt`` file beside each image.
``--encoder RAE_FOLDER`` stores an RAE's latents (its frozen encoder's standardised tokens, :mod:`ditlab.methods.rae`)
in place of a VAE's. ``--vae none`` stores the images themselves (pixel-space training, as the scene configs do):

    ditlab encode scenes:train:20000 --out /data/scenes-text --vae none --image-size 32 --text_encoder scene-clip

Ctrl-C or SIGTERM stop it cleanly (exit code 130 / 143, one line): the shards finished so far are kept, the
DataLoader workers are shut down, and rerunning the command finishes the rest. Killed outright, it takes its
workers with it (``ditlab.child_process.exit_with_parent``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from ditlab.child_process import RECEIVED
from ditlab.data.latents import encode_to_shards, open_source


class Terminated(Exception):
    """SIGTERM arrived: raised where the program is, as Ctrl-C raises ``KeyboardInterrupt``."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` (main thread only), so the encode loop unwinds: its workers are shut
    down and nothing half-done is written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def encode(source: str, out: str, vae: str | None = "stabilityai/sd-vae-ft-ema", image_size: int = 256,
           shard_size: int = 1024, batch_size: int = 64, mode: Literal["moments", "sample"] = "moments",
           flip: bool = False, dtype: Literal["float32", "float16", "bfloat16"] = "float32", seed: int = 0,
           rank: int | None = None, world_size: int | None = None, device: str = "auto", num_workers: int = 4,
           progress: bool = True, text_encoder: str | None = None,
           text_encoder_options: dict | None = None, encoder: str | None = None) -> int:  # fmt: skip
    """Pre-extract VAE latents (or pixels), and optionally caption features, into resumable shards for training.

    Rerunning the same command resumes; several processes (``torchrun``) split the shards by rank. SOURCE may be
    given first, without ``--source``.

    Args:
        source: an ImageNet-layout folder (SOURCE/<class>/<image>, captions in <image>.txt beside each image),
            ``digits``, or the digit scenes ``scenes[:SPLIT[:COUNT]]`` (e.g. ``scenes:validation:500``).
        out: shard folder (created; an existing one is resumed).
        vae: a local diffusers AutoencoderKL folder; ``none`` stores the images (pixel space, mode ``pixels``).
        image_size: ADM centre crop to this size (scenes: rendered at 32 or 64).
        shard_size: images per shard file.
        batch_size: images per VAE forward.
        mode: moments: posterior mean and std (resampled in training); sample: one fixed sample.
        flip: also store the horizontally flipped image's latents.
        dtype: storage precision.
        seed: noise seed of ``--mode sample``.
        rank: this process's rank (default: env RANK or 0).
        world_size: process count (default: env WORLD_SIZE or 1).
        device: auto | cpu | cuda | cuda:N (auto: cuda:LOCAL_RANK when there is a GPU).
        num_workers: DataLoader workers decoding images.
        progress: report progress (a bar in a terminal, lines in a log); ``--no-progress`` is silent.
        text_encoder: also store caption features from this text-encoder kind (scene-clip, clip-l, t5, ...).
        text_encoder_options: its keyword options, a JSON object (e.g. ``{"path": "/models/t5", "max_length": 120}``).
        encoder: an RAE folder (``python -m ditlab.methods.rae.train``): store its encoder's standardised latents in
            place of a VAE's (``--vae`` is then ignored at its default).
    """
    rank = rank if rank is not None else int(os.environ.get("RANK", 0))
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if vae is not None and vae.strip().lower() in ("none", "null", "pixels", ""):
        vae = None
    if encoder is not None and vae == "stabilityai/sd-vae-ft-ema":  # the default: the RAE replaces it
        vae = None
    images = open_source(source, image_size)
    try:
        with sigterm_raises():
            report = encode_to_shards(
                images, out, vae, image_size, shard_size=shard_size, batch_size=batch_size, mode=mode, flip=flip,
                dtype=dtype, seed=seed, rank=rank, world_size=world_size, device=device, num_workers=num_workers,
                progress=progress, text_encoder=text_encoder, text_encoder_options=text_encoder_options,
                encoder=encoder,
            )  # fmt: skip
    except (KeyboardInterrupt, Terminated) as stop:
        if isinstance(stop, KeyboardInterrupt) and signal.SIGINT not in RECEIVED:  # raised by code, not a user
            raise
        how, code = ("Ctrl-C", 130) if isinstance(stop, KeyboardInterrupt) else ("SIGTERM", 143)
        print(f"ditlab encode: rank {rank}/{world_size} stopped ({how}); the finished shards in {out} are kept, "
              "rerun the same command to encode the rest", file=sys.stderr)  # fmt: skip
        return code
    print(f"rank {rank}/{world_size}: wrote {len(report.written)} shards, {len(report.already_done)} were already "
          f"done; {len(report.skipped_files)} unreadable images skipped"
          + (f" ({', '.join(report.skipped_files[:5])}{' ...' if len(report.skipped_files) > 5 else ''})"
             if report.skipped_files else ""))  # fmt: skip
    state = "complete" if report.complete else "not complete yet (other ranks still writing, or rerun to finish)"
    print(f"{report.folder}: {state}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ditlab encode ARGS`` (what ``ditlab.cli`` runs)."""
    from ditlab.tools.command import run_tool

    return run_tool("encode", list(argv or []))
