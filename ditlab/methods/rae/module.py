"""``RAEModule``: a DiT trained in an RAE's latent space (Zheng et al. 2025, stage 2).

The latent space is the RAE's (:mod:`ditlab.methods.rae.autoencoder`): a frozen representation encoder's patch tokens,
standardised, ``(F, g, g)``; samples are decoded by the RAE's trained ViT decoder. Batches may be pixels (the digits,
the scenes, any image datamodule: encoded on the fly by the frozen encoder, on the module's device) or latents that
``ditlab encode --encoder RAE_FOLDER`` pre-extracted (``LatentDataModule``, ``sample_posterior: false``).

The paper's remedies for high-dimensional latents:

- width: the DiT's width should be at least the token dimension ``F`` (``network.hidden_size``; checked, one line);
- the noise-schedule shift ``sqrt(latent_dim / base_dim)`` (:mod:`ditlab.methods.rae.shift`) on the training times
  and, unless ``sampling.time_grid`` is set, the sampling grid (``shift:S``);
- the noise-augmented decoder (trained into the RAE folder: :mod:`ditlab.methods.rae.train`);
- the wide, shallow DDT head: ``network.block: ddt-head`` with ``trunk: ddt`` (:mod:`ditlab.methods.rae.ddt`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from jsonargparse import lazy_instance

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.diffusion.flow import FlowMatching
from ditlab.methods.base import DiffusionModule
from ditlab.methods.frozen import FrozenNetwork
from ditlab.methods.rae.autoencoder import load_rae
from ditlab.methods.rae.shift import RAE_BASE_DIM, ShiftedFlowMatching, dimension_shift
from ditlab.models.config import DiTConfig


def _spec(folder: Path) -> dict:
    import json

    from ditlab.methods.rae.autoencoder import SPEC

    path = folder / SPEC
    if not path.is_file():
        raise FileNotFoundError(f"model.init_args.rae: {folder} is not an RAE folder (no {SPEC}); train one with "
                                "python -m ditlab.methods.rae.train --config configs/rae_decoder.yaml")  # fmt: skip
    return json.loads(path.read_text())


class RAEModule(DiffusionModule):
    """A ``DiffusionModule`` whose latent space is an RAE's.

    Args:
        rae: an RAE folder (``python -m ditlab.methods.rae.train --out FOLDER``); null: ``decoder_recipe`` is trained
            once and cached.
        decoder_recipe: a YAML file with a ``recipe:`` entry (``configs/rae_decoder.yaml``), used when ``rae`` is null.
        time_shift: ``auto`` (``sqrt(latent_dim / base_dim)``), a number, or ``1`` (none). Flow objective only.
        base_dim: the dimension the shift is relative to (RAE: 4096; ditlab's digits configs: the pixel DiT's 256).
        width_check: refuse a network narrower than the latent tokens (the paper's Sec. 4.1 finding).
        **kwargs: ``DiffusionModule``'s arguments (``vae`` must stay null: the RAE decodes).
    """

    network_samples_alone = False
    """Its samples need the RAE's decoder: ``ditlab sample`` / ``eval`` go through :meth:`checkpoint_bundle`."""

    def __init__(self, rae: str | None = None, decoder_recipe: str | None = "configs/rae_decoder.yaml",
                 time_shift: float | str = "auto", base_dim: int = RAE_BASE_DIM, width_check: bool = True,
                 network: DiTConfig = lazy_instance(DiTConfig), objective: ObjectiveConfig = ObjectiveConfig(),
                 sampling: SamplingConfig = SamplingConfig(), **kwargs) -> None:  # fmt: skip
        if kwargs.get("vae") is not None:
            raise ValueError("model.init_args.vae: an RAE run decodes with its RAE (model.init_args.rae); set vae null")
        folder = self.resolve_folder(rae, decoder_recipe)
        spec = _spec(folder)
        channels, grid, _ = spec["latent_shape"]
        config = DiTConfig.plain(network)
        if (config.in_channels, config.input_size) != (channels, grid):
            raise ValueError(f"the RAE's latents are {channels}x{grid}x{grid}; set network.in_channels: {channels} and "
                             f"network.input_size: {grid} (and a patch_size dividing {grid}, RAE uses 1)")  # fmt: skip
        if width_check and config.hidden_size < channels * config.patch_size**2:
            raise ValueError(f"network.hidden_size={config.hidden_size} is narrower than a token's {channels} x "
                             f"{config.patch_size}^2 values: RAE (Sec. 4.1) needs width >= token dimension; widen it, "
                             "use the DDT head (block: ddt-head, trunk: ddt) or set width_check: false")  # fmt: skip
        self.rae_folder, self.rae_spec = str(folder), spec
        self.latent_dim = channels * grid * grid
        self.base_dim = base_dim
        if time_shift == "auto":
            shift = dimension_shift(self.latent_dim, base_dim)
        else:
            shift = float(time_shift)
        self.time_shift = shift
        kwargs["latent_scale"] = 1.0  # standardised latents
        super().__init__(network=config, objective=objective, sampling=sampling, **kwargs)
        self.hparams["rae"] = str(folder)  # a checkpoint reloads the folder it trained with, wherever it runs
        self._rae = FrozenNetwork(lambda: load_rae(folder))
        if shift != 1.0 and self.objective_config.kind != "flow":
            raise ValueError(f"time_shift={time_shift} applies to the flow objective (objective.kind: flow); set "
                             "time_shift: 1 for the gaussian objective")  # fmt: skip
        if shift != 1.0 and self.sampling.time_grid is None and self.sampling.sampler in (None, "euler", "heun"):
            self.sampling = replace(self.sampling, time_grid=f"shift:{shift:.6g}")
        self.summary["rae"] = {"folder": str(folder), "latent_shape": spec["latent_shape"], "time_shift": shift,
                               "base_dim": base_dim, "encoder": spec["encoder"]["name"],
                               "decoder_scores": spec.get("scores")}  # fmt: skip

    @staticmethod
    def resolve_folder(rae: str | None, decoder_recipe) -> Path:
        if rae is not None:
            return Path(rae).expanduser()
        if decoder_recipe is None:
            raise ValueError("model.init_args.rae and decoder_recipe are both null: name an RAE folder or a recipe")
        from ditlab.methods.rae.train import build_rae, recipe_from

        return build_rae(recipe_from(decoder_recipe))

    def attach(self, network, ema=None) -> None:
        super().attach(network, ema)
        shift = getattr(self, "time_shift", 1.0)
        if shift != 1.0 and isinstance(self.objective, FlowMatching):
            self.objective = ShiftedFlowMatching(self.objective, shift)

    # ----------------------------------------------------------------------------------- latent space
    @property
    def rae(self):
        """The frozen RAE (decoder and statistics; its encoder loads on first encode), on this module's device."""
        return self._rae.get(self.device)

    def to_latents(self, batch: torch.Tensor) -> torch.Tensor:
        """Pixels -> standardised RAE latents; pre-extracted latents pass as they are."""
        shape = tuple(self.rae_spec["latent_shape"])
        if tuple(batch.shape[1:]) == shape:
            return batch
        size, channels = self.rae_spec["image_size"], self.rae_spec["channels"]
        if batch.shape[-1] == size and batch.shape[1] in (channels, 1):
            return self.rae.encode_latents(batch)
        raise ValueError(f"an RAE run takes {channels}x{size}x{size} images or {'x'.join(map(str, shape))} latents "
                         f"(ditlab encode --encoder {self.rae_folder}); got batches of {tuple(batch.shape[1:])}")  # fmt: skip

    def unpack_batch(self, batch) -> tuple[torch.Tensor, object]:
        images, condition = super().unpack_batch(batch)
        return self.to_latents(images), condition

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """RAE latents -> images in [-1, 1] (not clamped) through the trained ViT decoder."""
        return self.rae.decode_latents(latents.to(self.device))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        meta = getattr(datamodule, "meta", None) if hasattr(type(datamodule), "meta") else None
        recorded = (meta or {}).get("vae") or {}
        if recorded.get("kind") == "rae":
            mine = self.rae.identity()
            if (recorded["config_hash"], recorded["weights_hash"]) != (mine["config_hash"], mine["weights_hash"]):
                raise ValueError(f"data.root holds latents of the RAE {recorded.get('path')}, but model.init_args.rae is "
                                 f"{self.rae_folder} (another encoder, decoder or statistics); re-encode or point rae "
                                 "at the encoding RAE")  # fmt: skip

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The run's entry names the RAE folder as its decoder (``vae``), scale 1."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["ditlab"]["vae"] = self.rae_folder
        checkpoint["ditlab"]["latent_scale"] = 1.0
        checkpoint["ditlab"]["rae"] = {"folder": self.rae_folder, "time_shift": self.time_shift}

    @classmethod
    def checkpoint_bundle(cls, checkpoint: dict, use_ema: bool = True):
        """What ``ditlab sample`` / ``eval`` sample: the network, decoded by the RAE folder the run recorded as its
        ``vae`` (``ditlab.data.vae.load_vae`` reads RAE folders)."""
        from ditlab.checkpoint import network_bundle

        return network_bundle(checkpoint, use_ema)
