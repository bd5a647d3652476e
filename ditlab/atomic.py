"""Files that appear whole or not at all, and a full disk that ends a run in one line instead of a traceback.

Every file ditlab writes (checkpoints, summary.json, sample grids, latent shards, the teacher cache, reference
statistics, self-trained metric networks) goes through :func:`write_atomic`: the bytes go to a temporary sibling
``.<name>.tmp-<pid>`` (same folder, so same filesystem and an atomic rename), are fsynced, and only then
``os.replace`` the final path; the folder is fsynced too so the rename survives a crash. A kill or a full disk
mid-write leaves the old file (or none), and the temporary is removed on any error.

Running out of space (``ENOSPC``) or quota (``EDQUOT``) is the user's to fix, not a bug: a write that hits it
raises :class:`DiskFull`, which names the file, the space it needed and the space left; whoever knows what is
already saved (the fit callbacks) adds it, and ``ditlab`` prints the whole as one line with exit code 2. Writers
that cannot be atomic (TensorBoard's append-only event files, DCP's per-process shards) are recognised by
:func:`out_of_space` from the ``OSError`` somewhere in the exception's chain.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """No space (or quota) left for ``path``; ``saved`` lists what is complete despite it, ``hint`` what to do."""

    def __init__(self, path: str | Path, needed: int | None = None, code: int = errno.ENOSPC) -> None:
        super().__init__(f"no space left writing {path}")
        self.errno = code
        self.path, self.needed = Path(path), needed
        self.free = free_bytes(self.path.parent)
        self.saved: list[str] = []
        self.hint = "free some space (or write elsewhere) and run it again"
        self.outcome = "it was not written"

    def __str__(self) -> str:
        what = "disk quota exceeded" if self.errno == errno.EDQUOT else "no space left on device"
        sizes = [f"needs about {megabytes(self.needed)}"] if self.needed else []
        if self.free is not None and self.errno != errno.EDQUOT:
            sizes.append(f"{megabytes(self.free)} free there")
        sizes_text = f" ({', '.join(sizes)})" if sizes else ""
        saved = f"; already saved: {', '.join(self.saved)}" if self.saved else ""
        return f"{what} writing {self.path}{sizes_text}; {self.outcome}{saved}; {self.hint}"


def megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def free_bytes(folder: Path) -> int | None:
    """Free bytes on ``folder``'s volume (its nearest existing parent), or None where that cannot be read."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def out_of_space(error: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT ``OSError`` behind ``error``: itself, a cause or context, or one of DCP's per-process
    failures (``CheckpointException.failures``: rank -> (exception, traceback)); None when running out of space
    is not what went wrong."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        error = pending.pop(0)
        if isinstance(error, tuple):
            pending.extend(error)
        if not isinstance(error, BaseException) or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in OUT_OF_SPACE:
            return error
        failures = getattr(error, "failures", None)
        pending.extend(failures.values() if isinstance(failures, dict) else ())
        pending.extend((error.__cause__, error.__context__))
    return None


def disk_full(error: BaseException) -> DiskFull | None:
    """``error`` as a :class:`DiskFull` when it comes from running out of space (None otherwise). A plain
    ``OSError`` comes from a writer that is not atomic (TensorBoard's event thread, a tool's output) and often has
    no file name: the innermost frame's ``filename`` or ``path`` local names it."""
    found = out_of_space(error)
    if found is None or isinstance(found, DiskFull):
        return found
    named = found.filename if isinstance(found.filename, str | bytes | os.PathLike) else None
    report = DiskFull(os.fsdecode(named) if named else written_file(found) or "a file of this run", code=found.errno)
    report.saved, report.hint = getattr(found, "saved", []), getattr(found, "hint", report.hint)
    report.outcome = "it may be incomplete"
    return report


def written_file(error: BaseException) -> str | None:
    """The ``filename`` / ``path`` argument of the innermost frame of ``error``'s traceback that has one."""
    frames, traceback = [], error.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in reversed(frames):
        for name in ("filename", "path"):
            value = frame.f_locals.get(name)
            if isinstance(value, str | bytes | Path):
                return os.fsdecode(value)
    return None


def note_saved(error: BaseException, saved: list[str], hint: str | None = None) -> None:
    """Record on ``error``'s out-of-space ``OSError`` what is complete despite it (and what to do next)."""
    found = out_of_space(error)
    if found is None:
        return
    found.saved = [*getattr(found, "saved", []), *saved]  # type: ignore[attr-defined]
    if hint:
        found.hint = hint  # type: ignore[attr-defined]


def quiet_writer_threads() -> None:
    """Stop background writers (TensorBoard's event thread) printing their own out-of-space traceback; the
    writer raises the same error again in the main thread, where it becomes one line."""
    previous = threading.excepthook
    if getattr(previous, "quiet_when_out_of_space", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if out_of_space(args.exc_value) is None:
            previous(args)

    hook.quiet_when_out_of_space = True  # type: ignore[attr-defined]
    threading.excepthook = hook


# ------------------------------------------------------------------------------------------------ writing
def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any], needed: int | None = None) -> Path:
    """``write(handle)`` into ``.<name>.tmp-<pid>`` beside ``path``, fsync, ``os.replace``, fsync the folder.
    Out of space -> :class:`DiskFull` (``needed``: the bytes it takes, when known); no temporary is left."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        found = out_of_space(error)
        if found is not None and not isinstance(found, DiskFull):
            raise DiskFull(path, needed, found.errno) from error
        raise
    fsync_folder(path.parent)
    return path


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (not supported on every platform or filesystem)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
    except OSError:
        pass


def save_bytes(data: bytes, path: str | Path) -> Path:
    return write_atomic(path, lambda handle: handle.write(data), len(data))


def save_text(text: str, path: str | Path) -> Path:
    return save_bytes(text.encode(), path)


def save_json(obj: Any, path: str | Path, **dumps: Any) -> Path:
    return save_text(json.dumps(obj, **dumps), path)


def save_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)``, streamed (no second copy in memory), atomically."""
    import torch

    return write_atomic(path, lambda handle: torch.save(obj, handle), tensor_bytes(obj))


def save_image_file(grid: Any, path: str | Path) -> Path:
    """A ``(C, H, W)`` image tensor in [0, 1] as the PNG ``path``."""
    from torchvision.utils import save_image

    buffer = io.BytesIO()
    save_image(grid, buffer, format="png")
    return save_bytes(buffer.getvalue(), path)


def copy_file(source: str | Path, path: str | Path) -> Path:
    size = Path(source).stat().st_size
    with open(source, "rb") as origin:
        return write_atomic(path, lambda handle: shutil.copyfileobj(origin, handle, 2**24), size)


def temporaries(path: str | Path) -> list[Path]:
    """Temporaries a killed writer of ``path`` left behind."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts, lists, tuples): what ``torch.save`` needs, near enough."""
    import torch

    storages: dict[int, int] = {}
    pending = [obj]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor) and not item.is_meta:
            storage = item.untyped_storage()
            storages[storage.data_ptr() or id(storage)] = storage.nbytes()
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list | tuple):
            pending.extend(item)
    return sum(storages.values())


# ------------------------------------------------------------------------------------------------ folders
def replace_folder(temporary: Path, path: Path) -> None:
    """Move the finished folder ``temporary`` to ``path``: the old one (a folder or a file) is set aside first and
    removed after, so ``path`` is always either the old complete checkpoint or the new one (or, for the instant
    between the two renames, absent)."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(temporary, path)
    fsync_folder(path.parent)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
