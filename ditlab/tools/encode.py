"""``ditlab encode SOURCE --out DIR``: pre-extract VAE latents of an image folder (or the digits) to shards.

Stores the posterior mean and std (REPA/edm2) or one sample, optionally the flipped image's latents too,
in ``shard-KKKKK.safetensors`` files of ``--shard-size`` images plus a ``meta.json`` (fast-DiT-style
pre-extraction, made resumable and multi-process). Rerunning the same command resumes: finished shards
are kept, a shard cut off mid-write is redone. Several processes split the shards by rank:

    torchrun --nproc_per_node 8 -m ditlab encode /data/imagenet/train --out /data/in256-latents --flip

Ctrl-C or SIGTERM stop it cleanly (exit code 130 / 143, one line): the shards finished so far are kept, the
DataLoader workers are shut down, and rerunning the command finishes the rest. Killed outright, it takes its
workers with it (``ditlab.child_process.exit_with_parent``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ditlab.child_process import RECEIVED
from ditlab.data.latents import DTYPES, MODES, digits_source, encode_to_shards, folder_source


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ditlab encode", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="an ImageNet-layout folder (SOURCE/<class>/<image>) or 'digits'")
    parser.add_argument("--out", required=True, help="shard folder (created; an existing one is resumed)")
    parser.add_argument(
        "--vae", default="stabilityai/sd-vae-ft-ema", help="local diffusers AutoencoderKL folder"
    )
    parser.add_argument("--image-size", type=int, default=256, help="ADM centre crop to this size")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    parser.add_argument("--batch-size", type=int, default=64, help="images per VAE forward")
    parser.add_argument("--mode", choices=MODES, default="moments",
                        help="moments: posterior mean and std (resampled in training); sample: one fixed sample")  # fmt: skip
    parser.add_argument(
        "--flip", action="store_true", help="also store the horizontally flipped image's latents"
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="storage precision")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of --mode sample")
    parser.add_argument("--rank", type=int, default=None, help="this process's rank (default: env RANK or 0)")
    parser.add_argument(
        "--world-size", type=int, default=None, help="process count (default: env WORLD_SIZE or 1)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: cuda:LOCAL_RANK if any)"
    )
    parser.add_argument("--num-workers", type=int, default=4, help="DataLoader workers decoding images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


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


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world_size = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    if args.source == "digits":
        source = digits_source(args.image_size)
    else:
        source = folder_source(args.source, args.image_size)
    try:
        with sigterm_raises():
            report = encode_to_shards(
                source, args.out, args.vae, args.image_size, shard_size=args.shard_size, batch_size=args.batch_size,
                mode=args.mode, flip=args.flip, dtype=args.dtype, seed=args.seed, rank=rank, world_size=world_size,
                device=device, num_workers=args.num_workers, progress=not args.no_progress,
            )  # fmt: skip
    except (KeyboardInterrupt, Terminated) as stop:
        if isinstance(stop, KeyboardInterrupt) and signal.SIGINT not in RECEIVED:  # raised by code, not a user
            raise
        how, code = ("Ctrl-C", 130) if isinstance(stop, KeyboardInterrupt) else ("SIGTERM", 143)
        print(f"ditlab encode: rank {rank}/{world_size} stopped ({how}); the finished shards in {args.out} are kept, "
              "rerun the same command to encode the rest", file=sys.stderr)  # fmt: skip
        return code
    print(f"rank {rank}/{world_size}: wrote {len(report.written)} shards, {len(report.already_done)} were already "
          f"done; {len(report.skipped_files)} unreadable images skipped"
          + (f" ({', '.join(report.skipped_files[:5])}{' ...' if len(report.skipped_files) > 5 else ''})"
             if report.skipped_files else ""))  # fmt: skip
    state = (
        "complete" if report.complete else "not complete yet (other ranks still writing, or rerun to finish)"
    )
    print(f"{report.folder}: {state}")
    return 0
