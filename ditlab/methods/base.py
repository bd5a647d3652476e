"""``DiffusionModule``: the LightningModule every method family extends.

It owns the core network, its EMA copy (the one that is sampled and exported), the diffusion
objective, the optimiser with linear warm-up, class-conditional training with label dropout for
classifier-free guidance, sampling, and per-block compile / activation checkpointing / FSDP2 sharding.
Training draws (timesteps, noise, label drop-outs) come from one checkpointed stream and belong to the
global batch (:meth:`training_draws`), so any number of processes trains the same run. Methods override
:meth:`training_losses` to add loss terms; everything else is shared.
"""

from __future__ import annotations

import copy
import math
import os

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.diffusion.gaussian import Noised
from ditlab.diffusion.global_batch import draw_rows
from ditlab.diffusion.images import ModelFactory, sample_from_config
from ditlab.distributed import (
    FSDP2Strategy,
    checkpoint_blocks,
    compile_blocks,
    data_parallel_split,
    local,
    shard,
)
from ditlab.methods.frozen import FrozenNetwork
from ditlab.models.components import pop_aux_losses
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT
from ditlab.models.loading import ditlab_entry, upgrade_layout


def stale_ema_share(decay: float | None, steps: int) -> float:
    """Weight the EMA network still gives its starting weights after ``steps`` updates at ``decay`` (0 without EMA)."""
    return 0.0 if decay is None or steps <= 0 else decay**steps


def fresh_ema_decay(steps: int, share: float = 0.05) -> float:
    """A decay, rounded down to 3 decimals, whose EMA keeps at most ``share`` of its starting weights after ``steps``."""
    return math.floor(share ** (1 / max(steps, 1)) * 1000) / 1000


class DiffusionModule(L.LightningModule):
    """Trains a DiT with a diffusion objective; see the config dataclasses for every option.

    Args:
        network: the DiT backbone: a preset (``digits``, ``S/2`` .. ``XL/8``) plus overrides and component slots;
            without one, DiT-XL/2 on 32x32x4 latents (subclasses that build their own network ignore it).
        objective: DDPM (``gaussian``) or interpolant (``flow``) training objective.
        sampling: how sample grids and metrics draw images.
        lr: AdamW learning rate (DiT: 1e-4 at batch 256).
        weight_decay: AdamW weight decay (DiT: 0).
        betas: AdamW betas.
        warmup_steps: linear learning-rate warm-up from 0 (DiT: none).
        ema_decay: decay of the EMA network, updated every step; None disables EMA.
        vae: a local diffusers ``AutoencoderKL`` folder when training in latent space; None for pixels.
        latent_scale: multiplier applied to VAE latents (0.18215 for SD-VAE).
        compile: ``torch.compile`` each block of the trained network (parameter names unchanged).
        activation_checkpointing: recompute each block's activations in backward (less memory, ~1/3 more compute).

    Sharding: under ``ditlab.distributed.FSDP2Strategy`` (``configs/trainer/fsdp.yaml``) ``configure_model``
    shards the network, its EMA copy and any trainable heads unit by unit (embedders, each block, final layer).
    """

    def __init__(
        self,
        network: DiTConfig = lazy_instance(DiTConfig),
        objective: ObjectiveConfig = ObjectiveConfig(),
        sampling: SamplingConfig = SamplingConfig(),
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        ema_decay: float | None = 0.9999,
        vae: str | None = None,
        latent_scale: float = 0.18215,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        network = None if self.builds_own_network else DiTConfig.plain(network)
        self.network_config, self.objective_config, self.sampling = network, objective, sampling
        self.save_hyperparameters()
        if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"model.ema_decay={ema_decay} must be in [0, 1), e.g. 0.9999, or null to disable EMA")
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        self.ema_decay = ema_decay
        self.network: DiT | None = None
        self.ema: DiT | None = None
        self.objective = None
        if not self.builds_own_network:
            self.attach(network.build())
        self.vae_path, self.latent_scale = vae, latent_scale
        self.compile_blocks, self.activation_checkpointing = compile, activation_checkpointing
        self._scaled_out = False
        self._draws: torch.Generator | None = None
        self._pending_draws: torch.Tensor | None = None  # the stream's state read from a checkpoint
        self._vae = FrozenNetwork(self._load_vae)
        self.summary: dict = {}
        """Entries callbacks add to the run's summary.json (metrics, teacher vs student, ...)."""
        self.skipped_step = False
        """Set by ``ditlab.callbacks.reliability.NaNGuard`` when this step's update was skipped (no EMA update)."""

    builds_own_network = False
    """True where a subclass builds the network itself (dicomp cuts it from a teacher)."""

    network_samples_alone = True
    """False where sampling needs more than the network (REG's class-token path): the checkpoint then records
    the module (``sampled_by``), whose ``checkpoint_bundle`` lets ``ditlab sample``/``eval`` sample it
    (``ditlab.checkpoint``); ``ditlab convert``, which exports a network alone, refuses it in one line."""

    def attach(self, network: DiT, ema: DiT | None = None) -> None:
        """Train ``network``: builds the objective that fits it and its EMA copy (``ema`` or a fresh copy)."""
        self.network = network
        self.objective = self.objective_config.build(network.learn_sigma)
        if self.ema_decay is not None:
            self.ema = (ema if ema is not None else copy.deepcopy(network)).requires_grad_(False).eval()

    # ----------------------------------------------------------------------------------- training
    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms for one batch; ``loss`` is what is optimised. Methods extend this."""
        noised, drop = self.training_draws(images, labels)
        output = self.network(noised.xt, noised.model_t, labels, force_drop_ids=drop)
        return self.objective.losses(output, images, noised)

    def training_draws(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[Noised, torch.Tensor | None]:
        """Timesteps, noise and label drop-outs (``force_drop_ids``, None when the network has no drop-out) of
        one batch: this process's rows of the global batch's draws, so a run does not depend on its process count."""
        rank, world_size = data_parallel_split(self._trainer)
        generator = self.training_generator(images.device)
        noised = self.objective.prepare(images, generator=generator, rank=rank, world_size=world_size)
        dropout = self.network.y_embedder.dropout_prob
        if not (self.network.training and dropout > 0):
            return noised, None
        draws = draw_rows(lambda n: torch.rand(n, device=images.device, generator=generator), len(labels), rank,
                          world_size)  # fmt: skip
        return noised, (draws < dropout).long()

    def seed_training_draws(self, seed: int) -> None:
        """Restart the training draws from ``seed`` (same-noise comparisons, ablations)."""
        self._draws, self._pending_draws = torch.Generator(device=self.device).manual_seed(seed), None

    def training_generator(self, device: torch.device) -> torch.Generator:
        """The stream every training draw comes from: seeded with the run's seed (``seed_everything``) on first
        use and saved in checkpoints, so neither model building, sampling grids, validation nor the process
        count moves it (DDP re-seeds the global RNG after the model is built; one process does not)."""
        if self._draws is None or self._draws.device != torch.device(device):
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            state = self._draws.get_state() if self._draws is not None else self._pending_draws
            self._draws = torch.Generator(device=device).manual_seed(seed)
            if state is not None:
                self._draws.set_state(state)
            self._pending_draws = None
        return self._draws

    @property
    def text_conditioned(self) -> bool:
        """Whether the trained network reads captions (``DiTConfig.condition: text``)."""
        return self.network is not None and self.network.config.text_conditioned

    def condition_input(self, labels):
        """A condition as the network takes it: captions encoded by the network's frozen text encoder (on this
        module's device, never saved), labels and encoded ``TextFeatures`` as they are."""
        from ditlab.models.text.prompts import condition_input

        return condition_input(self.network.config, labels, self.device)

    def unpack_batch(self, batch) -> tuple[torch.Tensor, object]:
        """``(images, condition)`` of a loader batch: ``(images, labels)``, or ``(images, labels, captions)`` (the
        digit scenes with captions), whose captions a text-conditioned network reads and a class-conditional one
        ignores."""
        images, labels = batch[0], batch[1]
        if self.text_conditioned:
            if len(batch) < 3 and not isinstance(labels, (list, tuple)) and not hasattr(labels, "null_rows"):
                raise ValueError("a text-conditioned network needs captions in its batches: set data.init_args.captions"
                                 " true (digit scenes) or give a datamodule whose batches carry captions")  # fmt: skip
            labels = batch[2] if len(batch) > 2 else labels
        return images, self.condition_input(labels)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = self.unpack_batch(batch)
        terms = self.training_losses(images, labels)
        auxiliary = pop_aux_losses(self.network)  # e.g. a router's balance loss, left by a block component
        if auxiliary:
            terms = {**terms, **auxiliary, "loss": terms["loss"] + sum(auxiliary.values())}
        # averaged over processes (sync_dist), so a logged loss is the global batch's whatever the process count
        self.log_dict({f"train/{name}": value.detach() for name, value in terms.items() if name != "loss"},
                      on_step=True, on_epoch=False, batch_size=len(images), sync_dist=True)  # fmt: skip
        self.log("train/loss", terms["loss"].detach(), prog_bar=True, on_step=True, batch_size=len(images),
                 sync_dist=True)  # fmt: skip
        return terms["loss"]

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = self.unpack_batch(batch)
        generator = torch.Generator(device=images.device).manual_seed(1234 + batch_idx)
        noised = self.objective.prepare(images, generator=generator)
        network = self.ema if self.ema is not None else self.network
        terms = self.objective.losses(network(noised.xt, noised.model_t, labels), images, noised)
        self.log("val/loss", terms["loss"], prog_bar=True, sync_dist=True, batch_size=len(images))

    def configure_model(self) -> None:
        """Per-block activation checkpointing, compile and (under ``FSDP2Strategy``) sharding, applied once.

        Subclasses that build their network here (dicomp's student) build it first, then call this; after
        replacing the network later (a pruning stage, a graft), call :meth:`reconfigure`.
        """
        if self.network is None or self._scaled_out:
            return
        self._scaled_out = True
        if self.activation_checkpointing:
            checkpoint_blocks(self.network)
        if self.compile_blocks:
            compile_blocks(self.network)
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDP2Strategy):
            shard(self, strategy)
        elif isinstance(strategy, ModelParallelStrategy):
            raise ValueError("trainer.strategy: use ditlab.distributed.FSDP2Strategy (configs/trainer/fsdp.yaml) for "
                             "sharded training; plain ModelParallelStrategy does not know how to shard a DiT")  # fmt: skip

    def reconfigure(self) -> None:
        """Re-apply checkpointing, compile and sharding to a network that was replaced or edited after
        :meth:`configure_model` ran (the caller rebuilds the optimiser, and under DDP the wrapper)."""
        self._scaled_out = False
        DiffusionModule.configure_model(self)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimiser step, then the EMA update, so a checkpoint saved in ``on_train_batch_end`` (callbacks run
        before the module's hook) already holds step ``k``'s EMA, and a step skipped by ``NaNGuard`` leaves it."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not self.skipped_step:
            self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema <- decay * ema + (1 - decay) * network`` on every trainable tensor; buffers copied."""
        ema_params = [local(p) for p in self.ema.parameters()]  # under FSDP each process updates its shard
        net_params = [local(p) for p in self.network.parameters()]
        torch._foreach_lerp_(ema_params, net_params, 1.0 - self.ema_decay)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains: the network's parameters that require grad. Methods that train more
        (alignment heads) or less (a router on a frozen backbone) override this, not the optimiser."""
        return [p for p in self.network.parameters() if p.requires_grad]

    def configure_optimizers(self):
        """AdamW over :meth:`trainable_parameters` with a linear learning-rate warm-up."""
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, betas=self.betas,
                                      weight_decay=self.weight_decay)  # fmt: skip
        warmup = max(1, self.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def stage_starts(self) -> list[tuple[int, str]]:
        """``(step, stage)`` where each later stage of this method starts (none here; dicomp lists its phases)."""
        return []

    def on_fit_start(self) -> None:
        """One line naming every stage (a method's phase, a callback's: progressive cuts, alignment termination) that
        ``trainer.max_steps`` ends the run before, so a cut-short run (a quick look, a test) does not skip them
        without a word."""
        trainer = self._trainer  # None when a test or notebook calls the hook by hand
        if trainer is None or trainer.max_steps < 0 or not trainer.is_global_zero:
            return
        starts = [*self.stage_starts(), *(start for callback in trainer.callbacks if hasattr(callback, "stage_starts")
                                          for start in callback.stage_starts(self))]  # fmt: skip
        missed = sorted(start for start in starts if start[0] >= trainer.max_steps)
        if missed:
            print(f"warning: trainer.max_steps={trainer.max_steps} ends the run before "
                  + "; ".join(f"{stage} (from step {step})" for step, stage in missed), flush=True)  # fmt: skip
        left = trainer.max_steps - getattr(trainer, "global_step", 0)
        stale = stale_ema_share(self.ema_decay if self.ema is not None else None, left)
        if stale > 0.05:  # the sampled, evaluated and exported weights would be largely the starting ones
            print(f"warning: model.ema_decay={self.ema_decay} over the {left} steps "
                  f"left keeps {stale:.0%} of the starting weights in the EMA network (what is sampled, evaluated and "
                  f"exported); for a run this short lower it (e.g. {fresh_ema_decay(left)}) or set it to null", flush=True)  # fmt: skip

    # ----------------------------------------------------------------------------------- sampling
    @property
    def sampling_network(self) -> DiT:
        """The EMA network when there is one: the weights that are sampled, evaluated and exported."""
        return self.ema if self.ema is not None else self.network

    def sample(self, labels: torch.Tensor, seed: int = 0, start: int = 0, show_progress: bool = False,
               network: DiT | None = None, factory: ModelFactory | None = None, **overrides) -> torch.Tensor:  # fmt: skip
        """Images in [-1, 1], ``(N, C, H, W)``, for ``labels: (N,)``; sample ``i`` uses seed ``seed + start + i``.

        ``network`` defaults to the EMA network (a teacher can be sampled the same way); ``overrides``
        replace fields of ``self.sampling`` (sampler, steps, cfg_scale, cache, ...). The one sampling path
        (``ditlab.diffusion.images``) makes the model function with ``factory`` (default: the network through
        the feature cache ``cache`` names).
        """
        network = network if network is not None else self.sampling_network
        return sample_from_config(network, self.objective, self.sampling, labels, seed=seed, start=start, factory=factory,
                                  decode=lambda latents: self.decode(latents.to(self.device)).clamp(-1, 1).cpu(),
                                  progress="sampling" if show_progress else None, **overrides)  # fmt: skip

    # ----------------------------------------------------------------------------------- latent space
    @property
    def vae(self) -> nn.Module | None:
        """The frozen VAE, loaded on first use and never saved in checkpoints."""
        return self._vae.get(self.device) if self.vae_path is not None else None

    def _load_vae(self) -> nn.Module:
        from ditlab.data.vae import load_vae

        return load_vae(self.vae_path)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Network space -> images in [-1, 1]; identity in pixel space."""
        if self.vae is None:
            return latents
        from ditlab.data.vae import decode_latents

        return decode_latents(self.vae, latents, self.latent_scale)

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the architecture so a checkpoint rebuilds its (possibly pruned) network alone."""
        checkpoint["ditlab"] = ditlab_entry(self.network.config, self.objective_config, self.sampling, self.vae_path,
                                            self.latent_scale)  # fmt: skip
        if not self.network_samples_alone:
            checkpoint["ditlab"]["sampled_by"] = f"{type(self).__module__}.{type(self).__qualname__}"
        if self._draws is not None:
            checkpoint["ditlab"]["training_draws"] = self._draws.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Continue the training draws where the checkpoint left them (exact resume)."""
        upgrade_layout(checkpoint)  # a file an earlier version wrote, in today's layout before anything reads it
        state = checkpoint.get("ditlab", {}).get("training_draws")
        self._draws, self._pending_draws = None, state
        self.adopt_text_encoder(checkpoint.get("ditlab", {}).get("dit_config", {}))

    def adopt_text_encoder(self, recorded: dict) -> None:
        """Resuming: read captions with the text encoder the checkpoint was trained with (its pinned options, e.g.
        an earlier default scene CLIP recipe), keeping this machine's ``cache_dir``; one line when that differs
        from what the config names today."""
        if self.network is None or not self.text_conditioned:
            return
        theirs = recorded.get("condition_options") or {}
        ours = self.network.config.to_record()["condition_options"]
        if theirs.get("encoder") != ours.get("encoder") or "encoder_options" not in theirs:
            return
        adopted = {**theirs["encoder_options"], **({"cache_dir": ours["encoder_options"]["cache_dir"]}
                                                   if "cache_dir" in ours["encoder_options"] else {})}  # fmt: skip
        if adopted != ours["encoder_options"]:
            print(f"resuming with the checkpoint's text encoder options ({ours['encoder']}), not today's defaults: "
                  "its weights were trained on them", flush=True)  # fmt: skip
            for network in (self.network, self.ema):
                if network is not None:
                    network.config.condition_options["encoder_options"] = dict(adopted)

    def num_parameters(self) -> int:
        """Parameters of the sampled network (including DiT's frozen position embedding)."""
        return sum(p.numel() for p in self.sampling_network.parameters())
