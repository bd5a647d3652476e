"""Pre-encoded text features in ``ditlab encode`` shards: captions encoded once, never by the training loop.

Why: a text-to-image DiT trains against a frozen text encoder (PixArt's T5, SD3's CLIP/T5), and rerunning that
encoder on every step costs as much as the VAE did before latents were pre-extracted (PixArt-alpha extracts T5
features offline for the same reason). ``ditlab encode SOURCE --text_encoder NAME`` therefore stores, next to
each row's latents or pixels, the caption's features as its text encoder gave them:

- ``text_tokens (n, L, D)`` and ``text_pooled (n, P)`` in the shard's ``--dtype``; ``text_mask (n, L)`` uint8
  (1: a real token, 0: padding); the encoder pads to a fixed ``L``, so rows of different shards stack;
- once per folder, ``text-null.safetensors``: the empty caption's ``tokens (1, L, D)``, ``pooled (1, P)``,
  ``mask (1, L)``, the null condition of classifier-free guidance and caption drop-out
  (:attr:`~ditlab.models.text.features.TextFeatures.null`). A resumed or parallel run compares its own empty-caption
  features with the stored ones, so other weights behind the same encoder name are refused, not mixed in;
- in ``meta.json`` under ``text``: the encoder's kind and options and the widths ``length``, ``dim``,
  ``pooled_dim`` (part of the folder's fingerprint, so a resume with another encoder is refused in one line).

The reading side (:class:`TextCollate`) turns each loader batch's rows into one ``TextFeatures`` with ``null`` set,
which :meth:`ditlab.methods.base.DiffusionModule.unpack_batch` passes through un-encoded; :func:`check_network`
refuses a text-conditioned network that names another encoder than the one the features came from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch.utils.data import default_collate

from ditlab.atomic import save_bytes
from ditlab.models.text.features import TextEncoder, TextFeatures

NULL_FILE = "text-null.safetensors"
TOKENS, POOLED, MASK = "text_tokens", "text_pooled", "text_mask"
NAMES = (TOKENS, POOLED, MASK)


def build_encoder(name: str, options: dict | None, device: str) -> tuple[TextEncoder, TextFeatures]:
    """The frozen encoder ``name`` on ``device`` and its empty-caption features (on the CPU)."""
    from ditlab.models.text.registry import build_text_encoder

    if not isinstance(options or {}, dict):
        raise ValueError(f"--text_encoder_options must be a JSON object of keyword options, got {options!r}")
    encoder = build_text_encoder(name, **(options or {})).to(device)
    null = encoder([""])
    return encoder, TextFeatures(null.tokens.cpu(), null.pooled.cpu(), null.mask.cpu())


def text_meta(name: str, options: dict | None, null: TextFeatures) -> dict:
    """``meta.json``'s ``text`` entry: who encoded the captions (options pinned to the weights that did it) and the
    widths of what they gave."""
    from ditlab.models.text.registry import pinned_text_options

    return {"encoder": name, "encoder_options": pinned_text_options(name, options or {}), "length": int(null.tokens.shape[1]),
            "dim": int(null.tokens.shape[2]), "pooled_dim": int(null.pooled.shape[1])}  # fmt: skip


def describe(text: dict, against: dict | None = None) -> str:
    """``'kind' {options}``; beside ``against`` (the other side of a mismatch) the kind alone, or for the same kind
    only the options that differ, nested ones (the scene CLIP's recipe) by dotted name."""
    options = text.get("encoder_options") or {}
    if against is not None:
        same = against.get("encoder") == text["encoder"]
        options = differing(options, against.get("encoder_options") or {}) if same else {}
    return f"{text['encoder']!r}{f' {options}' if options else ''}"


def differing(ours: dict, theirs: dict, prefix: str = "") -> dict:
    """The entries of ``ours`` that ``theirs`` lacks or holds otherwise, dicts compared entry by entry."""
    found = {}
    for key, value in ours.items():
        other = theirs.get(key)
        if isinstance(value, dict) and isinstance(other, dict):
            found.update(differing(value, other, f"{prefix}{key}."))
        elif key not in theirs or other != value:
            found[f"{prefix}{key}"] = value
    return found


def feature_tensors(features: TextFeatures, text: dict, dtype: torch.dtype, encoder: str) -> dict[str, torch.Tensor]:
    """One batch's features as shard tensors (stored dtype, mask as uint8); refused when the widths moved."""
    shape = (tuple(features.tokens.shape[1:]), features.pooled.shape[1])
    if shape != ((text["length"], text["dim"]), text["pooled_dim"]):
        raise ValueError(f"text encoder {encoder!r} gave tokens {shape[0]} and pooled width {shape[1]} for some "
                         f"captions but {(text['length'], text['dim'])} and {text['pooled_dim']} for the empty one; "
                         "only an encoder that pads to a fixed length can be stored")  # fmt: skip
    return {TOKENS: features.tokens.detach().cpu().to(dtype), POOLED: features.pooled.detach().cpu().to(dtype),
            MASK: features.mask.cpu().to(torch.uint8)}  # fmt: skip


def empty_tensors(text: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The text tensors of a shard whose images were all unreadable."""
    return {TOKENS: torch.zeros(0, text["length"], text["dim"], dtype=dtype),
            POOLED: torch.zeros(0, text["pooled_dim"], dtype=dtype), MASK: torch.zeros(0, text["length"], dtype=torch.uint8)}  # fmt: skip


def _null_tensors(null: TextFeatures, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"tokens": null.tokens.to(dtype).contiguous(), "pooled": null.pooled.to(dtype).contiguous(),
            "mask": null.mask.to(torch.uint8).contiguous()}  # fmt: skip


def write_null(folder: str | Path, null: TextFeatures, dtype: torch.dtype, text: dict) -> None:
    """Store the empty caption's features once; a folder already holding other ones is refused (other weights)."""
    path = Path(folder) / NULL_FILE
    mine = _null_tensors(null, dtype)
    if not path.is_file():
        save_bytes(save(mine), path)
        return
    stored = load_file(str(path))
    same = stored.keys() == mine.keys() and all(stored[k].shape == mine[k].shape for k in mine)
    if same:
        same = torch.equal(stored["mask"], mine["mask"]) and all(
            torch.allclose(stored[k].float(), mine[k].float(), rtol=1e-3, atol=1e-4) for k in ("tokens", "pooled")
        )
    if not same:
        raise ValueError(f"shard folder {folder} holds text features of another {describe(text)} encoder (its "
                         f"empty-caption features in {NULL_FILE} differ from this encoder's): the weights behind "
                         f"the name changed; choose another folder or delete {folder}")  # fmt: skip


def read_null(folder: str | Path, text: dict) -> TextFeatures:
    """The folder's empty-caption features ``(1, L, D)`` (float32, bool mask): the ``null`` of every batch."""
    path = Path(folder) / NULL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"text shard folder {folder} has no {NULL_FILE} (the empty caption's features); "
                                f"rerun the same `ditlab encode ... --text_encoder {text['encoder']}` command")  # fmt: skip
    stored = load_file(str(path))
    return TextFeatures(stored["tokens"].float(), stored["pooled"].float(), stored["mask"].bool())


def read_row(handle, local: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row ``local`` of an open shard: ``(tokens (L, D) float32, pooled (P,) float32, mask (L,) bool)``."""
    return (handle.get_slice(TOKENS)[local].float(), handle.get_slice(POOLED)[local].float(),
            handle.get_slice(MASK)[local].bool())  # fmt: skip


class TextCollate:
    """Loader items ``(x, label, (tokens, pooled, mask))`` -> ``(x (B, ...), labels (B,), TextFeatures)`` with the
    folder's empty-caption features as ``null`` (picklable, so DataLoader workers can run it)."""

    def __init__(self, null: TextFeatures) -> None:
        self.null = null

    def __call__(self, items: list) -> tuple:
        x, labels = default_collate([item[:2] for item in items])
        tokens, pooled, mask = (torch.stack(part) for part in zip(*(item[2] for item in items)))
        return x, labels, TextFeatures(tokens, pooled, mask, self.null)


def check_network(config, text: dict | None, folder: str | Path) -> None:
    """Refuse (one line) a text-conditioned network ``config`` (a ``DiTConfig``) that does not read these features:
    shards without text, another encoder kind or options, or other token/pooled widths. Class-conditional
    networks ignore the text."""
    if not getattr(config, "text_conditioned", False):
        return
    options = config.condition_options
    if text is None:
        raise ValueError(f"the network is text-conditioned but {folder} holds no text features; encode it with "
                         f"`ditlab encode SOURCE --text_encoder {options.get('encoder') or 'NAME'} ...`")  # fmt: skip
    from ditlab.models.text.registry import options_before_pins, pinned_text_options

    name = options.get("encoder")
    wanted = {"encoder": name, "encoder_options": pinned_text_options(name, options.get("encoder_options") or {})
              if name else {}}  # fmt: skip
    stored = options_before_pins(text["encoder"], text.get("encoder_options", {}))  # older shards: what they meant
    if (wanted["encoder"], wanted["encoder_options"]) != (text["encoder"], stored):
        theirs = {"encoder": text["encoder"], "encoder_options": stored}
        raise ValueError(f"the network's condition_options.encoder is {describe(wanted, theirs)} but the text features "
                         f"in {folder} were encoded by {describe(theirs, wanted)}; set condition_options.encoder/encoder_options "
                         f"to match, or re-encode with --text_encoder {wanted['encoder'] or 'NAME'}")  # fmt: skip
    text_dim, pooled_dim = options.get("text_dim"), int(options.get("pooled_dim", 0) or 0)
    if text_dim != text["dim"] or (pooled_dim and pooled_dim != text["pooled_dim"]):
        raise ValueError(f"the network reads text widths text_dim={text_dim}, pooled_dim={pooled_dim} but {folder} "
                         f"holds {text['dim']} and {text['pooled_dim']}; set condition_options text_dim/pooled_dim "
                         "to match")  # fmt: skip
