"""Loading a DiT from any file ditlab supports, in one place: :func:`load_network`.

Formats: a ditlab Lightning checkpoint (``.ckpt``, or a folder of FSDP shards), a ``ditlab convert``
safetensors export (``.safetensors`` + ``.json``, or its folder), a public facebookresearch/DiT file
(``.pt``/``.pth``/``.bin`` or a bare ``.safetensors`` state dict; architecture read off the tensors) and a
diffusers ``DiTTransformer2DModel`` (or pipeline) folder. ditlab checkpoints and exports carry their
:class:`~ditlab.models.config.DiTConfig`, so any architecture the config describes (pruned widths, other
attention or MLP components) rebuilds; the component kinds they name must be registered (imported) first.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load`` with one-line errors for a missing, truncated or corrupt file; a sharded (FSDP)
    checkpoint folder is gathered into the same single dictionary."""
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        return read_sharded_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .ckpt file (runs/<name>/version_N/checkpoints/)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(f"checkpoint {path} is truncated or corrupt and cannot be read ({type(error).__name__}); "
                         "use an earlier checkpoint such as last.ckpt") from None  # fmt: skip


def read_sharded_checkpoint(path: Path) -> dict:
    """A ``FSDP2Strategy`` checkpoint folder (one shard file per process plus ``meta.pt``) as one full dictionary."""
    import tempfile

    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        try:
            dcp_to_torch_save(path, Path(scratch) / "full.pt")
            tensors = torch.load(Path(scratch) / "full.pt", map_location="cpu", weights_only=False)
            meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
        except (Exception, CheckpointException) as error:  # any reader error means the same thing to the user
            raise ValueError(f"sharded checkpoint {path} is incomplete or corrupt ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:120]}); use an earlier checkpoint") from None  # fmt: skip
    return {**meta, **tensors}


def _prefixed(state_dict: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def network_from_checkpoint(checkpoint: dict | str | Path, use_ema: bool = True) -> DiT:
    """The DiT of a ditlab checkpoint (the EMA weights unless ``use_ema=False``)."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    if "ditlab" not in checkpoint:
        raise ValueError("this is not a ditlab checkpoint (no 'ditlab' entry); public DiT checkpoints load "
                         "with ditlab.models.interop.load_dit_checkpoint")  # fmt: skip
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
