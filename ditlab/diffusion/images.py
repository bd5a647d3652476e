"""The one path from sampling settings to images: a model function made by a factory, then seeded batches.

Training callbacks (``DiffusionModule.sample``), the tools and notebooks (``ditlab.analysis``) and every method
that samples differently (REG's extra token) meet here, so the protocol (the options, the seeds, batching, the
decode of each batch) is written once. What wraps the network (nothing, a feature cache, a learned plan, REG's
joint state) is the *factory*'s business, ``factory(network, objective, **sampling_options) -> model function``:
the core names no method family; the default factory is the registered cache policy ``sampling.cache`` names
(``ditlab.diffusion.cache``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch

from ditlab.diffusion.cache import cache_model_function
from ditlab.diffusion.guidance import ModelFunction
from ditlab.diffusion.sample import model_device, null_label_of, sample_images, sample_shape
from ditlab.progress import TaskProgress

ModelFactory = Callable[..., ModelFunction]


def sampling_options(sampling, **overrides: Any) -> dict[str, Any]:
    """The fields of a ``SamplingConfig`` as keyword options (nested configs kept as they are), ``overrides`` on top."""
    unknown = set(overrides) - {item.name for item in fields(sampling)}
    if unknown:
        raise ValueError(f"unknown sampling option(s) {sorted(unknown)}; choices: {[item.name for item in fields(sampling)]}")
    return {**{item.name: getattr(sampling, item.name) for item in fields(sampling)}, **overrides}


def network_condition(network: torch.nn.Module, labels, device: torch.device):
    """``labels`` as ``network`` takes them: a network that encodes captions exposes ``condition_input``
    (``ditlab.models.dit.DiT`` does); any other takes its labels as given."""
    encode = getattr(network, "condition_input", None)
    if callable(encode):
        return encode(labels, device)
    if isinstance(labels, (list, tuple)):
        raise ValueError(f"{type(network).__name__} does not encode captions; give it class labels (a tensor)")
    return labels


def model_function(network: torch.nn.Module, objective, sampling, factory: ModelFactory | None = None,
                   **overrides: Any) -> ModelFunction:  # fmt: skip
    """What :func:`sample_from_config` samples: ``factory`` applied to ``network``; the default,
    :func:`~ditlab.diffusion.cache.cache_model_function`, wraps it in the feature cache ``sampling.cache`` names."""
    options = sampling_options(sampling, **overrides)
    options.pop("batch_size")
    return (factory or cache_model_function)(network, objective, **options)


def sample_from_config(network: torch.nn.Module, objective, sampling, labels: torch.Tensor, *, seed: int = 0,
                       start: int = 0, factory: ModelFactory | None = None, model: ModelFunction | None = None,
                       decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       shape: tuple[int, int, int] | None = None, progress: str | None = None,
                       **overrides: Any) -> torch.Tensor:  # fmt: skip
    """Samples of ``network`` for ``labels: (N,)``, sample ``i`` from noise seed ``seed + start + i`` whatever the
    batch size, each batch of ``sampling.batch_size`` passed through ``decode`` (latents to pixels) when given.

    ``sampling`` is a ``SamplingConfig``; ``overrides`` replace its fields. The model function is ``model`` when
    given (built once to read a cache's counters afterwards), else ``factory``'s (see :func:`model_function`);
    ``network`` is sampled in eval mode and left in the mode it had. ``progress`` names a progress line (None:
    silent); ``shape`` ``(C, H, W)`` (unless given), the device and the guidance null class are the network's.
    """
    options = sampling_options(sampling, **overrides)
    batch_size = options.pop("batch_size")
    shape, device = shape or sample_shape(network), model_device(network)
    was_training = network.training
    network.eval()
    try:
        model = model if model is not None else model_function(network, objective, sampling, factory, **overrides)
        options.pop("cache")
        chunks = []
        with TaskProgress(progress or "sampling", len(labels), enabled=progress is not None) as bar:
            for offset in range(0, len(labels), batch_size):
                condition = network_condition(network, labels[offset : offset + batch_size], device)
                chunk = sample_images(model, objective, condition, seed=seed,
                                      start=start + offset, batch_size=batch_size, shape=shape, device=device,
                                      null_label=null_label_of(network), **options)  # fmt: skip
                chunks.append(decode(chunk) if decode is not None else chunk)
                bar.advance(len(chunk))
    finally:
        network.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)
