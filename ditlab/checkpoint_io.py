"""Checkpoints that are never half-written: a kill mid-save leaves the old file (or none), never a torso.

Lightning's ``TorchCheckpointIO`` serialises to memory and then writes straight to the final path, so a
SIGKILL or a full disk during that write leaves a truncated ``last.ckpt`` that no resume can read. Here the
write goes through :func:`ditlab.atomic.save_torch` (temporary sibling, fsync, ``os.replace``), and a full
disk is a one-line :class:`ditlab.atomic.DiskFull`.
Loading is plain data only (``ditlab.models.loading.read_checkpoint``: ``weights_only`` plus ditlab's config
classes), so ``fit --ckpt_path`` never runs code from a checkpoint someone shared, and an unreadable or refused
file is one line (``ValueError``) instead of a zip-reader traceback.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ditlab.atomic import save_torch
from ditlab.models.loading import read_checkpoint, trusts_checkpoints


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
        save_torch(checkpoint, path)

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict:
        if "://" in str(path):  # remote: Lightning's reader, plain data unless the user trusts checkpoints
            return super().load_checkpoint(path, map_location=map_location, weights_only=not trusts_checkpoints())
        return read_checkpoint(path)
