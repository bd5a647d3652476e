"""Loading a DiT from any file ditlab supports, in one place: :func:`load_network`.

Formats: a ditlab Lightning checkpoint (``.ckpt``, or a folder of FSDP shards), a ``ditlab convert``
safetensors export (``.safetensors`` + ``.json``, or its folder), a public facebookresearch/DiT file
(``.pt``/``.pth``/``.bin`` or a bare ``.safetensors`` state dict; architecture read off the tensors) and a
diffusers ``DiTTransformer2DModel`` (or pipeline) folder. ditlab checkpoints and exports carry their
:class:`~ditlab.models.config.DiTConfig`, so any architecture the config describes (pruned widths, other
attention or MLP components, block and trunk kinds) rebuilds; a kind not yet registered is found by importing the
installed families (``ditlab.plugins``). The layout of a ditlab checkpoint is written and read here only
(:func:`ditlab_entry`, :func:`network_from_checkpoint`); files an earlier version wrote are brought to it by
:func:`upgrade_layout`.

Checkpoints are files people pass around, and unpickling one runs whatever callables its pickle names. So
every read here is plain-data only: ``torch.load(weights_only=True)`` (tensors, numbers, strings,
containers) plus ditlab's own config dataclasses (``DiTConfig``, ``ObjectiveConfig``, the method configs,
...; allowlisted with ``torch.serialization.add_safe_globals`` as a file names them), and a sharded folder's
DCP metadata is read by an unpickler that builds only DCP's own metadata records. A file holding anything
else is refused in one line (:class:`UntrustedCheckpointError`) naming what it holds. For a file you trust,
``DITLAB_TRUST_CHECKPOINTS=1`` loads it fully (``weights_only=False``), as ditlab did before.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import torch

from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT

TRUST_VARIABLE = "DITLAB_TRUST_CHECKPOINTS"
"""Set to 1 to load checkpoints fully (their pickles may run code): only for files you trust."""

UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)


class UntrustedCheckpointError(ValueError):
    """A checkpoint names something other than plain data or ditlab configs; loading it could run code."""


def trusts_checkpoints() -> bool:
    """True when the user opted in (``DITLAB_TRUST_CHECKPOINTS=1``) to loading checkpoints fully."""
    return os.environ.get(TRUST_VARIABLE, "").strip().lower() in ("1", "true", "yes")


def refusal(what: str, names: Iterable[str]) -> UntrustedCheckpointError:
    """The one-line error for ``what`` (e.g. ``checkpoint <path>``) naming the globals it holds."""
    listed = ", ".join(sorted(set(names))[:3])
    return UntrustedCheckpointError(
        f"{what} holds {listed}, which is not plain data (tensors, numbers, strings, containers, ditlab configs) "
        f"and could run code when loaded, so it was not loaded; if you trust this file, set {TRUST_VARIABLE}=1"
    )


MOVED_MODULES = {
    "ditlab.methods.accel": "ditlab.methods.sampling.caches",
    "ditlab.methods.cache_router": "ditlab.methods.sampling.cache_router",
    "ditlab.methods.feedback": "ditlab.methods.sampling.feedback",
    "ditlab.models.encoders": "ditlab.methods.align.encoders",
}
"""Packages that moved, old name -> new: config classes pickled under the old name still load."""


def config_class(name: str) -> type | None:
    """The ditlab config dataclass a pickle names as ``module.Class``, else None (it stays refused).

    Only ditlab's own modules are imported to resolve a name (never a ``__main__``), and only a dataclass
    defined in ditlab is accepted: unpickling one sets its fields, which hold plain data themselves.
    """
    module_name, _, qualname = name.rpartition(".")
    for old, new in MOVED_MODULES.items():  # a file written before a package moved names its old module
        if module_name == old or module_name.startswith(old + "."):
            module_name = new + module_name[len(old):]
    parts = module_name.split(".")
    if parts[0] != "ditlab" or "__main__" in parts:
        return None
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    for attribute in qualname.split("."):
        found = getattr(found, attribute, None)
    if isinstance(found, type) and dataclasses.is_dataclass(found) and found.__module__.split(".")[0] == "ditlab":
        return found
    return None


def allow_config_classes(names: Iterable[str]) -> list[str]:
    """Allowlist, for ``weights_only`` loads in this process, the ditlab config classes among the pickle global
    ``names``; returns the names that stay refused. A class re-exported or moved is registered under the name the
    file uses."""
    refused = []
    for name in names:
        cls = config_class(name)
        if cls is None:
            refused.append(name)
        elif f"{cls.__module__}.{cls.__qualname__}" == name:
            torch.serialization.add_safe_globals([cls])
        else:
            torch.serialization.add_safe_globals([(cls, name)])
    return refused


def _named_globals(source: str | Path | IO[bytes]) -> list[str]:
    """The globals a ``torch.save`` file names beyond the allowlist; [] when it cannot be scanned (a legacy or
    corrupt file: the load that follows reports it)."""
    start = source.tell() if hasattr(source, "tell") else None
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # any reader error: the real load gives the message
        return []
    finally:
        if start is not None:
            source.seek(start)


def load_plain(source: str | Path | IO[bytes], what: str, **options) -> Any:
    """``torch.load`` of plain data and ditlab configs only (``weights_only=True``); refuses anything else in one
    line naming it. ``DITLAB_TRUST_CHECKPOINTS=1`` loads fully instead. ``options`` go to ``torch.load``."""
    if trusts_checkpoints():
        return torch.load(source, weights_only=False, **options)
    refused = allow_config_classes(_named_globals(source))
    if refused:
        raise refusal(what, refused)
    try:
        return torch.load(source, weights_only=True, **options)
    except pickle.UnpicklingError as error:  # a legacy (non-zip) file is only checked while it loads
        named = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
        if named is None:
            raise
        raise refusal(what, [named.group(1)]) from None


def check_checkpoint(path: str | Path) -> None:
    """Refuse, in one line, a checkpoint file or sharded folder that holds anything but plain data, before a reader
    that does not check opens it (Lightning's FSDP resume); allowlists the ditlab config classes it names."""
    path = Path(path)
    if trusts_checkpoints():
        return
    if path.is_dir() and (path / ".metadata").is_file():
        read_sharded_checkpoint(path, tensors=False)
    elif path.is_file():
        refused = allow_config_classes(_named_globals(path))
        if refused:
            raise refusal(f"checkpoint {path}", refused)


def read_checkpoint(path: str | Path) -> dict:
    """A ditlab checkpoint (plain data only, see the module notes) with one-line errors for a missing, truncated or
    corrupt file; a sharded (FSDP) checkpoint folder is gathered into the same single dictionary."""
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        return upgrade_layout(read_sharded_checkpoint(path))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .ckpt file (runs/<name>/version_N/checkpoints/)")
    try:
        return upgrade_layout(load_plain(path, f"checkpoint {path}", map_location="cpu"))
    except UntrustedCheckpointError:
        raise
    except UNREADABLE as error:
        raise ValueError(f"checkpoint {path} is truncated or corrupt and cannot be read ({type(error).__name__}); "
                         "use an earlier checkpoint such as last.ckpt") from None  # fmt: skip


LEGACY_ROUTER = re.compile(r"^((?:network|ema)\.)block_router\.")


def upgrade_layout(checkpoint: dict) -> dict:
    """Rewrite, in place, what earlier ditlab versions wrote in another layout, so every reader sees one layout.

    Before the Mixture of Blocks became a trunk kind, Dense2MoE recorded it beside the architecture
    (``dense2moe.mixture_of_blocks``: group size and active blocks) and stored its routers as ``block_router.*``;
    today it is ``trunk: mixture-of-blocks`` in ``dit_config`` with its routers under ``trunk.router.*``.
    Text-encoder options recorded before their kind was pinned get the options they meant then
    (:meth:`DiTConfig.upgrade_record`).
    """
    mixture = (checkpoint.get("dense2moe") or {}).get("mixture_of_blocks")
    meta = checkpoint.get("ditlab")
    if meta and "dit_config" in meta:
        meta["dit_config"] = DiTConfig.upgrade_record(meta["dit_config"])
    if mixture and meta and meta.get("dit_config", {}).get("trunk", "blocks") == "blocks":
        meta["dit_config"] = {**meta["dit_config"], "trunk": "mixture-of-blocks", "trunk_options": dict(mixture)}
        state = checkpoint.get("state_dict", {})
        for key in [key for key in state if LEGACY_ROUTER.match(key)]:
            state[LEGACY_ROUTER.sub(r"\1trunk.router.", key)] = state.pop(key)
    return checkpoint


def read_sharded_checkpoint(path: Path, tensors: bool = True) -> dict:
    """A ``FSDP2Strategy`` checkpoint folder (DCP shards, one file per process, plus ``meta.pt``) as one full
    dictionary, read as plain data; ``tensors=False`` reads (and so checks) everything but the tensors."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    from ditlab.models.sharded import PlainDataPlanner, read_dcp

    path = Path(path)
    planner = PlainDataPlanner(f"sharded checkpoint {path}")
    try:
        state = read_dcp(path, planner, tensors=tensors)
        meta = load_plain(path / "meta.pt", planner.what, map_location="cpu")
    except UntrustedCheckpointError:
        raise
    except (Exception, CheckpointException) as error:  # any reader error means the same thing to the user
        if planner.refused is not None:  # raised inside DCP's reader, which wraps it
            raise planner.refused from None
        raise ValueError(f"sharded checkpoint {path} is incomplete or corrupt ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:120]}); use an earlier checkpoint") from None  # fmt: skip
    return {**meta, **state}


def ditlab_entry(config: DiTConfig, objective: Any, sampling: Any, vae: str | None = None,
                 latent_scale: float = 0.18215) -> dict:
    """The ``ditlab`` entry of a checkpoint: the one layout every writer records and :func:`network_from_checkpoint`
    (with ``ditlab.checkpoint.run_settings``) reads back. ``objective`` and ``sampling`` are their config
    dataclasses (stored as plain dicts); the weights sit beside it under ``network.`` (and ``ema.``)."""
    return {"dit_config": config.to_record(), "objective": dataclasses.asdict(objective),
            "sampling": dataclasses.asdict(sampling), "vae": vae, "latent_scale": latent_scale}


def network_checkpoint(network: torch.nn.Module, objective: Any, sampling: Any) -> dict:
    """A whole checkpoint of ``network`` alone (exports, tests): its ``ditlab`` entry and its weights."""
    state = {f"network.{key}": value.detach().cpu() for key, value in network.state_dict().items()}
    return {"ditlab": ditlab_entry(network.config, objective, sampling), "state_dict": state}


def _prefixed(state_dict: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def network_from_checkpoint(checkpoint: dict | str | Path, use_ema: bool = True) -> DiT:
    """The DiT of a ditlab checkpoint (the EMA weights unless ``use_ema=False``)."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    if "ditlab" not in checkpoint:
        raise ValueError("this is not a ditlab checkpoint (no 'ditlab' entry); public DiT checkpoints load "
                         "with ditlab.models.interop.load_dit_checkpoint")  # fmt: skip
    module = checkpoint["ditlab"].get("sampled_by")
    if module:
        raise ValueError(f"this checkpoint samples through more than a network (its module {module}: a router's plan "
                         "or a feedback block over a teacher, REG's class-token path), so a tool that needs the network "
                         "alone cannot take it; `ditlab sample`/`ditlab eval` (ditlab.checkpoint.sample_checkpoint) "
                         "sample it")  # fmt: skip
    network = DiT(DiTConfig.from_dict(checkpoint["ditlab"]["dit_config"]))
    state_dict = checkpoint["state_dict"]
    weights = _prefixed(state_dict, "ema.") if use_ema else {}
    weights = weights or _prefixed(state_dict, "network.")
    load_matching(network, weights, "checkpoint")
    return network.eval()


def load_matching(network: torch.nn.Module, weights: dict, source: str) -> None:
    """``load_state_dict(strict=True)`` whose error names the mismatching keys and shapes in one line."""
    own = network.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if any(key.startswith("trunk.") for key in unexpected) and not any(key.startswith("trunk.") for key in own):
        raise ValueError(f"{source} holds the weights of a dynamic-compute network (trunk.* routers), not a plain "
                         "DiT; load it with load_network, which builds it from the checkpoint's config")  # fmt: skip
    shapes = [f"{k}: {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in weights and weights[k].shape != own[k].shape]  # fmt: skip
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatches {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise ValueError(f"{source} does not fit this architecture: {'; '.join(parts)} "
                         "(was it trained with another depth/width, or pruned?)")  # fmt: skip
    network.load_state_dict(weights)


def load_network(source: str | Path | dict, use_ema: bool = True, **overrides) -> DiT:
    """The DiT in ``source`` (a path in any supported format, or a loaded checkpoint / state dict), in eval
    mode. ``use_ema`` picks the EMA weights of a ditlab checkpoint; ``overrides`` set what a public DiT
    file's tensors cannot tell (``num_heads`` off-preset, ``freq_shift``, ``num_classes``, ...)."""
    from ditlab.models import interop

    if isinstance(source, dict):
        if "ditlab" in source and "state_dict" in source:
            return network_from_checkpoint(source, use_ema)
        return interop.load_dit_checkpoint(source, **overrides)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / ".metadata").is_file():
            return network_from_checkpoint(read_checkpoint(path), use_ema)
        if (path / "config.json").is_file() or (path / "transformer" / "config.json").is_file():
            from ditlab.models import diffusers_t2i

            if diffusers_t2i.folder_class(path) in diffusers_t2i.CONVERTERS:
                return diffusers_t2i.load_folder(path)
            return interop.from_diffusers(interop.load_diffusers(path), **overrides)
        if (path / "dit.safetensors").is_file():
            return interop.load_safetensors(path)
        raise FileNotFoundError(f"{path} holds no DiT: expected a sharded checkpoint (.metadata), a diffusers folder "
                                "(config.json) or a `ditlab convert` export (dit.safetensors)")  # fmt: skip
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a ditlab .ckpt, a public DiT .pt, a .safetensors "
                                "export or a diffusers folder")  # fmt: skip
    if path.suffix == ".ckpt":
        return network_from_checkpoint(read_checkpoint(path), use_ema)
    if path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
        return interop.load_safetensors(path)
    return interop.load_dit_checkpoint(path, **overrides)
