"""Captions in, the network's text condition out: the one place a text-conditioned network meets its text encoder.

A text-conditioned network names its frozen encoder in ``condition_options`` (``encoder``, ``encoder_options``);
training, sampling grids, ``ditlab sample --prompt`` and evaluation all turn captions into ``TextFeatures`` here, so
they encode the same way. The encoder is built once per process and kind (never stored in a checkpoint).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache

import torch

from ditlab.models.text.features import TextEncoder, TextFeatures
from ditlab.models.text.registry import build_text_encoder, pinned_text_options


def is_captions(labels) -> bool:
    """Whether a condition input is a list of captions (rather than labels or encoded features)."""
    return isinstance(labels, (list, tuple)) and all(isinstance(caption, str) for caption in labels)


@lru_cache(maxsize=4)
def _encoder(name: str, options: str) -> TextEncoder:
    return build_text_encoder(name, **json.loads(options))


def text_encoder_of(config) -> TextEncoder:
    """The frozen text encoder a text-conditioned ``config`` (a ``DiTConfig``) names; one line when it names none."""
    options = config.condition_options
    name = options.get("encoder")
    if not name:
        raise ValueError("this text-conditioned network names no text encoder: set condition_options.encoder (e.g. "
                         "scene-clip, clip-l, t5) or pass encoded TextFeatures instead of captions")  # fmt: skip
    pinned = pinned_text_options(name, options.get("encoder_options", {}))  # one encoder per set of weights
    return _encoder(name, json.dumps(pinned, sort_keys=True))


def encode_prompts(config, captions: Sequence[str], device: torch.device | str | None = None) -> TextFeatures:
    """``captions`` encoded by ``config``'s text encoder, checked against the widths the network was built for."""
    encoder = text_encoder_of(config)
    if device is not None:
        encoder.to(device)
    features = encoder(list(captions))
    expected = (config.condition_options.get("text_dim"), config.condition_options.get("pooled_dim", 0))
    found = (features.tokens.shape[-1], features.pooled.shape[-1])
    if found[0] != expected[0] or (expected[1] and found[1] != expected[1]):
        raise ValueError(f"text encoder {config.condition_options['encoder']!r} gives token/pooled widths {found}, "
                         f"the network was built for {expected}; set condition_options text_dim/pooled_dim to match")  # fmt: skip
    return features if device is None else features.to(device)


def condition_input(config, labels, device: torch.device | str | None = None):
    """``labels`` as the network takes them: captions are encoded for a text-conditioned network; labels and
    ``TextFeatures`` pass through (refused in one line when they do not fit the network's condition)."""
    text = getattr(config, "text_conditioned", False)
    if is_captions(labels):
        if not text:
            raise ValueError("captions given to a class-conditional network; pass class labels (or train a "
                             "text-conditioned network: configs/pixart.yaml, configs/mmdit.yaml)")  # fmt: skip
        return encode_prompts(config, labels, device)
    if text and not isinstance(labels, TextFeatures):
        raise ValueError("this network is text-conditioned: give captions (a list of str) or TextFeatures, not "
                         f"{type(labels).__name__}")  # fmt: skip
    return labels
