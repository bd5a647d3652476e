"""Reading a DCP checkpoint folder (``torch.distributed.checkpoint``, what ``FSDP2Strategy`` writes) as plain data.

DCP keeps a folder's index (``.metadata``) as a plain pickle and its non-tensor entries (optimiser settings,
step counters) as ``torch.save`` bytes, and reads both with the full unpickler, so a shared folder could run
code when read. Here the index is read by an unpickler that builds only DCP's own metadata records and the
torch sizes, dtypes and paths they hold, and the byte entries go through
:func:`ditlab.models.loading.load_plain` (``weights_only`` plus ditlab configs). ``DITLAB_TRUST_CHECKPOINTS=1``
reads a trusted folder fully.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import pickle
from pathlib import Path
from typing import IO, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from ditlab.models.loading import UntrustedCheckpointError, load_plain, refusal, trusts_checkpoints

RECORD_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
"""Where DCP's metadata records live; their dataclasses and enums may be built."""
PLAIN_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"),
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
}  # fmt: skip


def metadata_global(module: str, name: str) -> bool:
    """Whether a DCP index may name ``module.name``: DCP's records, torch sizes, dtypes and layouts, paths."""
    if (module, name) in PLAIN_GLOBALS:
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module in RECORD_MODULES:
        record = getattr(importlib.import_module(module), name, None)
        return isinstance(record, type) and (dataclasses.is_dataclass(record) or issubclass(record, enum.Enum))
    return False


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP index; any other global is refused (:class:`UntrustedCheckpointError`) before it is built."""

    def __init__(self, file: IO[bytes], what: str) -> None:
        super().__init__(file)
        self.what = what

    def find_class(self, module: str, name: str) -> Any:
        if not metadata_global(module, name):
            raise refusal(self.what, [f"{module}.{name}"])
        return super().find_class(module, name)


def read_dcp_metadata(path: Path, what: str) -> Metadata:
    """The DCP index at ``path`` (``<folder>/.metadata``), built only from DCP's own records."""
    with open(path, "rb") as handle:
        metadata = pickle.load(handle) if trusts_checkpoints() else MetadataUnpickler(handle, what).load()
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class PlainDataReader(FileSystemReader):
    """DCP's file reader, handed the index :func:`read_dcp_metadata` already read (DCP would unpickle it)."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class PlainDataPlanner(_EmptyStateDictLoadPlanner):
    """Rebuilds the whole saved dictionary (as ``dcp_to_torch_save`` does) with byte entries read as plain data.

    A refusal raised inside DCP's read comes back wrapped in a ``CheckpointException``; it is kept in
    :attr:`refused` so the caller can report it as itself.
    """

    def __init__(self, what: str, keys: list[str] | None = None) -> None:
        super().__init__(keys=keys)
        self.what = what
        self.refused: UntrustedCheckpointError | None = None

    def load_bytes(self, read_item, value) -> None:
        try:
            loaded = load_plain(value, self.what)
        except UntrustedCheckpointError as error:
            self.refused = error
            raise
        key = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[key], loaded)
        else:
            self.state_dict[key] = loaded


def read_dcp(folder: Path, planner: PlainDataPlanner, tensors: bool = True) -> dict:
    """The dictionary saved in DCP ``folder``; ``tensors=False`` reads only its non-tensor entries."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # what dcp_to_torch_save runs

    metadata = read_dcp_metadata(folder / ".metadata", planner.what)
    if not tensors:
        entries = metadata.state_dict_metadata
        planner.keys = [key for key, entry in entries.items() if isinstance(entry, BytesStorageMetadata)]
        if not planner.keys:
            return {}
        if not all(key in (metadata.planner_data or {}) for key in entries):  # subsets need DCP's key paths
            planner.keys = None
    state: dict = {}
    _load_state_dict(state, storage_reader=PlainDataReader(folder, metadata), planner=planner, no_dist=True)
    return state
