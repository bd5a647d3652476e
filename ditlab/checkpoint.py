"""Reading ditlab checkpoints outside Lightning, and sampling one in a single call: :func:`sample_checkpoint`.

A ditlab Lightning checkpoint carries a ``ditlab`` entry (written by ``DiffusionModule``) with the
architecture, objective, sampling and VAE settings, so a pruned student rebuilds at its own depth and a
checkpoint never needs the config file that trained it. A run whose samples need more than its network (a
learned router's plan over its teacher, ILF's feedback block, REG's class token) records the module that knows
how (``sampled_by``); that module's ``checkpoint_bundle(checkpoint, use_ema)`` rebuilds what it samples as a
:class:`Bundle` with a model-function *factory*, so every run samples through the one config-to-images path
(``ditlab.diffusion.images.sample_from_config``), from ``ditlab sample``, ``ditlab eval`` and Python alike.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.diffusion.images import ModelFactory, model_function, sample_from_config
from ditlab.models.dit import DiT
from ditlab.models.loading import load_matching, load_network, network_from_checkpoint, read_checkpoint

__all__ = ["Bundle", "bundle_from_checkpoint", "known_fields", "run_settings", "load_matching", "network_from_checkpoint",
           "read_checkpoint", "sample_bundle", "sample_checkpoint", "sampling_model", "through_teacher"]  # fmt: skip


@dataclass
class Bundle:
    """Everything needed to sample a trained run."""

    network: DiT
    objective: object
    sampling: SamplingConfig
    vae: str | None
    latent_scale: float
    factory: ModelFactory | None = None
    """What wraps the network when sampled (a router's plan, ILF's feedback); None: the cache ``sampling.cache``
    names (``ditlab.diffusion.images.model_function``)."""
    shape: tuple[int, int, int] | None = None
    """The sampled state ``(C, H, W)`` when it carries more than the image (REG's class-token plane); the image is
    its first ``network.in_channels`` channels. None: the network's image shape."""
    source: str = "the network"
    """What is sampled, in words (``ditlab sample`` prints it)."""


def known_fields(cls, values: dict) -> dict:
    """The entries of ``values`` that are fields of dataclass ``cls`` (older checkpoints may carry others)."""
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in values.items() if key in names}


def run_settings(meta: dict) -> tuple[ObjectiveConfig, SamplingConfig]:
    """The objective and sampling settings recorded in a checkpoint's ``ditlab`` entry."""
    return (ObjectiveConfig(**known_fields(ObjectiveConfig, meta["objective"])),
            SamplingConfig(**known_fields(SamplingConfig, meta["sampling"])))  # fmt: skip


LEGACY_SAMPLERS = {"cache_router": "ditlab.methods.sampling.cache_router.module.CacheRouterModule",
                   "feedback": "ditlab.methods.sampling.feedback.module.FeedbackModule"}  # fmt: skip
"""Router and ILF checkpoints written before they recorded a ``ditlab`` entry: their own entry names the module."""


def sampled_by(checkpoint: dict, path: str | Path) -> str | None:
    """The module a checkpoint's samples need (``ditlab.sampled_by``), None when the network samples alone."""
    meta = checkpoint.get("ditlab")
    if meta is not None:
        return meta.get("sampled_by")
    for entry, module in LEGACY_SAMPLERS.items():
        if entry in checkpoint:
            return module
    raise ValueError(f"{path} is not a ditlab checkpoint (no 'ditlab' entry); pass a checkpoint that `ditlab fit` "
                     "wrote (runs/<name>/version_N/checkpoints/final.ckpt)")  # fmt: skip


def sampling_module(name: str) -> type:
    """The class a checkpoint names in ``sampled_by``; only ditlab's own modules are imported."""
    module, _, qualname = name.rpartition(".")
    found = getattr(importlib.import_module(module), qualname, None) if module.split(".")[0] == "ditlab" else None
    if not hasattr(found, "checkpoint_bundle"):
        raise ValueError(f"this checkpoint is sampled by {name}, which cannot rebuild its sampler from a checkpoint; "
                         f"load it with {qualname}.load_from_checkpoint(path) and call .sample(labels)")  # fmt: skip
    return found


def network_bundle(checkpoint: dict, use_ema: bool = True) -> Bundle:
    """The run's own (EMA) network with the settings it recorded, whatever module trained it."""
    meta = {key: value for key, value in checkpoint["ditlab"].items() if key != "sampled_by"}
    network = network_from_checkpoint({**checkpoint, "ditlab": meta}, use_ema)
    objective, sampling = run_settings(meta)
    has_ema = use_ema and any(key.startswith("ema.") for key in checkpoint["state_dict"])
    return Bundle(network, objective.build(network.learn_sigma), sampling, meta.get("vae"),
                  meta.get("latent_scale", 0.18215), source="the EMA network" if has_ema else "the network")  # fmt: skip


def bundle_from_checkpoint(path: str | Path, use_ema: bool = True) -> Bundle:
    """What ``ditlab sample --ckpt path`` samples: the network (or the module's sampler), objective and settings."""
    checkpoint = read_checkpoint(path)
    module = sampled_by(checkpoint, path)
    if module:
        return sampling_module(module).checkpoint_bundle(checkpoint, use_ema)
    return network_bundle(checkpoint, use_ema)


def through_teacher(checkpoint: dict, factory: ModelFactory, source: str) -> Bundle:
    """The frozen teacher a run recorded (``ditlab.teacher``), sampled with the run's settings through ``factory``:
    how a run that trained something over a teacher (a router, a feedback block) samples."""
    meta = checkpoint.get("ditlab") or {}
    teacher = meta.get("teacher") or (checkpoint.get("cache_router") or {}).get("teacher")
    if teacher is None:
        raise ValueError("this checkpoint does not record its teacher (written before ditlab recorded it); retrain it, "
                         "or sample its module with .load_from_checkpoint(path).sample(labels)")  # fmt: skip
    if not Path(teacher).exists():
        raise FileNotFoundError(f"this run samples its teacher {teacher}, which does not exist here; copy the teacher "
                                "to that path (or rebuild its recipe)")  # fmt: skip
    if Path(teacher).suffix == ".ckpt" or (Path(teacher) / ".metadata").is_file():
        bundle = network_bundle(read_checkpoint(teacher))
    else:  # a public DiT file, a safetensors export or a diffusers folder: the run recorded its objective
        network = load_network(teacher)
        objective, sampling = run_settings(meta)
        bundle = Bundle(network, objective.build(network.learn_sigma), sampling, meta.get("vae"),
                        meta.get("latent_scale", 0.18215))  # fmt: skip
    sampling = run_settings(meta)[1] if "sampling" in meta else bundle.sampling
    return replace(bundle, sampling=sampling, factory=factory, source=f"the teacher {teacher} through {source}")


# ----------------------------------------------------------------------------------- sampling
def sampling_model(bundle: Bundle, sampling: SamplingConfig):
    """What ``sampling`` samples: the bundle's factory (or the cache policy) applied to its network."""
    return model_function(bundle.network, bundle.objective, sampling, bundle.factory)


def sample_bundle(bundle: Bundle, labels, sampling: SamplingConfig | None = None, seed: int = 0,
                  progress: str | None = None, model=None) -> torch.Tensor:  # fmt: skip
    """Images in [-1, 1], ``(N, C, H, W)``, of a bundle for ``labels`` (``(N,)`` classes, or captions); sample ``i``
    uses noise seed ``seed + i`` whatever the batch size. ``sampling`` (default: the run's) picks the sampler, steps,
    guidance, time grid, SDE and cache; latents are decoded by the run's VAE, a batch at a time, so ``progress`` (a
    description; None: silent) counts images. ``model`` is :func:`sampling_model`'s result when the caller reads the
    cache policy afterwards."""
    from ditlab.data.vae import decode_latents, load_vae

    sampling = sampling if sampling is not None else bundle.sampling
    vae = load_vae(bundle.vae) if bundle.vae is not None else None
    channels = bundle.network.in_channels

    def decode(state: torch.Tensor) -> torch.Tensor:
        image = state[:, :channels]
        return decode_latents(vae, image, bundle.latent_scale) if vae is not None else image

    return sample_from_config(bundle.network, bundle.objective, sampling, labels, seed=seed, factory=bundle.factory,
                              model=model, decode=decode, shape=bundle.shape, progress=progress).clamp(-1, 1)  # fmt: skip


def sample_checkpoint(path: str | Path, labels, seed: int = 0, sampling: SamplingConfig | None = None,
                      ema: bool = True, progress: str | None = None, **overrides) -> torch.Tensor:  # fmt: skip
    """Images in [-1, 1], ``(N, C, H, W)``, exactly as ``ditlab sample --ckpt path --seed seed`` draws them for
    ``labels`` (``(N,)`` class ids): the run's recorded sampler, steps, guidance and cache (``sampling`` replaces
    them, ``overrides`` replace single fields: ``steps=20``), its VAE, and whatever the run samples through (a
    router's plan, ILF's feedback block, REG's class token). ``ema=False`` samples the raw network."""
    bundle = bundle_from_checkpoint(path, use_ema=ema)
    sampling = replace(sampling if sampling is not None else bundle.sampling, **overrides)
    return sample_bundle(bundle, labels, sampling, seed, progress)
