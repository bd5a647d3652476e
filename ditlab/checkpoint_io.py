"""Checkpoints that are never half-written: a kill mid-save leaves the old file (or none), never a torso.

Lightning's ``TorchCheckpointIO`` serialises to memory and then writes straight to the final path, so a
SIGKILL or a full disk during that write leaves a truncated ``last.ckpt`` that no resume can read. Here the
bytes go to a temporary file in the same folder (same filesystem, so the rename is atomic), are fsynced,
and only then ``os.replace`` the final path; the folder is fsynced too so the rename survives a crash.
Loading is plain data only (``ditlab.models.loading.read_checkpoint``: ``weights_only`` plus ditlab's config
classes), so ``fit --ckpt_path`` never runs code from a checkpoint someone shared, and an unreadable or refused
file is one line (``ValueError``) instead of a zip-reader traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ditlab.models.loading import read_checkpoint, trusts_checkpoints


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save(obj, path)`` through ``<dir>/.<name>.tmp-<pid>`` + fsync + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (not supported on every platform/filesystem)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes, plain-data reads and one-line errors for unreadable checkpoints."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO.save_checkpoint takes no storage_options, got {storage_options!r}"
            )
        if "://" in str(path):  # remote filesystems: no local rename; keep Lightning's behaviour
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        if "://" in str(path):  # remote: Lightning's reader, plain data unless the user trusts checkpoints
            return super().load_checkpoint(path, map_location=map_location, weights_only=not trusts_checkpoints())
        return read_checkpoint(path)
