"""``CacheRouterModule``: learn which branches a frozen DiT recomputes at each sampling step (L2C, HarmoniCa).

Learning-to-Cache (Ma et al., "Learning-to-Cache: Accelerating Diffusion Transformer via Layer Caching", NeurIPS
2024; horseee/learning-to-cache) and HarmoniCa (Huang et al., "HarmoniCa: Harmonizing Training and Inference for
Better Feature Caching in Diffusion Transformer Acceleration", ICML 2025; ModelTC/HarmoniCa) train a static router
(``router.py``) on a frozen backbone; only the router is trained and only the router is saved. Two modes:

- ``l2c``: pairs from data. Steps alternate full / cached (even / odd calls); a training pair noises a real image
  to the full step ``k - 1`` that precedes a random cached step ``k``, runs that full step (which fills the cache),
  moves to ``k`` with the sampler, and matches the routed output at ``k`` to the full one. Even rows are frozen.
- ``harmonica``: step-wise denoising training (SDT), no images. A trajectory starts from noise with random classes;
  call 0 computes everything (its row is frozen); each training step then trains the next call ``k``: the teacher
  (the full network) and the routed student both see the student's current sample, the loss is
  ``lambda_k * MSE + beta * sum(s_k)``, and the sample moves on with the *student's* prediction, so the cache
  carries over from step to step as it will at inference. ``lambda`` is the image-error proxy (``proxy.py``),
  refreshed every C steps by ``ditlab.methods.sampling.cache_router.ImageErrorProxy`` (all ones without it).

One optimiser step per training step (``automatic_optimization`` off: the router is clamped after every update).
A HarmoniCa trajectory spans several training steps; its state (sample, classes, cache, position) is saved in
checkpoints with the draw stream, so a resumed run continues on the same trajectory. Rollouts step through the
sampler's trajectory (``ditlab.diffusion.trajectory``), so a router trains on any time grid, SDE and guidance
interval the sampler takes. The router (and so the plan exported from it) belongs to one schedule (sampler, step
count, call times), recorded in the checkpoint; another is refused (``ditlab.methods.sampling.schedule``).
Loss terms, the router as an image (step x unit) and the share of units computed go to TensorBoard.

Text-conditioned teachers (PixArt, MM-DiT; HarmoniCa was measured on PixArt-alpha) train the same way on captions
(``ditlab.methods.sampling.conditions``): HarmoniCa's trajectories start from the captions of random digit-scene
training scenes, L2C's pairs take the images and captions of the batches (the digit scenes with captions), both
encoded by the teacher's frozen text encoder, with the empty caption as the null condition of guidance and drop-out.
The router's columns are the teacher's units (three per PixArt block: self-attention, cross-attention, MLP; per
MM-DiT block the joint attention and the two-stream MLP, each unit both streams, so text and image are cached alike).

Class labels are dropped to the null class while training as each reference does (``RouterConfig.label_dropout``):
L2C's ``train_router.py`` runs its DiT in train mode and ``router_training_losses`` draws one drop-out mask per
sample (probability 0.1) that the full step and both calls of the pair share; HarmoniCa's ``train_router.py`` runs
its DiT in eval mode with ``label_for_dropout=None``, so it drops none. Read against horseee/learning-to-cache
d6cc7817842e1353b8d902af263bab030b8478da (``DiT/train_router.py``, ``DiT/diffusion/gaussian_diffusion.py``) and
ModelTC/HarmoniCa 5d7f78d8019122b3d2c53620543ea79d24fa81f6 (``train_router.py``, ``models/router_models.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ditlab.checkpoint import Bundle, through_teacher
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.diffusion.global_batch import draw_rows
from ditlab.diffusion.sample import null_label_of
from ditlab.diffusion.trajectory import Trajectory, trajectory_options
from ditlab.distributed import data_parallel_split
from ditlab.methods.base import DiffusionModule
from ditlab.methods.sampling.cache_router.export import plan_factory, plan_from_checkpoint
from ditlab.methods.sampling.cache_router.proxy import image_error_proxy, loss_weights
from ditlab.methods.sampling.cache_router.routed import Cache, routed_call
from ditlab.methods.sampling.cache_router.router import StepUnitRouter
from ditlab.methods.sampling.caches.plan import StaticPlan
from ditlab.methods.sampling.conditions import (
    batch_conditions,
    draw_conditions,
    drop_conditions,
    encode_conditions,
    loaded_conditions,
    saved_conditions,
)
from ditlab.methods.sampling.schedule import check_schedule, check_teacher_sampler, schedule_times
from ditlab.methods.teacher import FromTeacher, TeacherConfig, teacher_path
from ditlab.models.dit import DiT

PAIR_SAMPLERS = ("ddim", "euler", "sde")
LABEL_DROPOUT = {"l2c": 0.1, "harmonica": 0.0}
"""Each mode's reference label drop-out while training (``RouterConfig.label_dropout: null`` takes it)."""
"""Samplers whose step from call ``k - 1`` needs nothing but that call (L2C builds each pair from one full step)."""


@dataclass
class RouterConfig:
    """What is learned and how.

    Args:
        mode: ``harmonica`` (step-wise denoising training from noise) or ``l2c`` (pairs from data).
        threshold: a unit is computed when its score exceeds this (L2C and HarmoniCa: 0.1).
        sparsity: beta, the weight of ``sum(s_k)`` in the loss (L2C at 20 steps: 5e-6; HarmoniCa: 7e-8, both on
            DiT-XL/2; sweep it, results are sensitive to it).
        clamp: theta is clamped to ``[-clamp, clamp]`` after every update.
        init: ``normal`` (N(0, 1), L2C) or ``constant``.
        init_value: theta everywhere for ``init: constant``.
        seed: seed of the normal initialisation.
        train_cfg_scale: guidance while training (HarmoniCa: 1.5); None uses ``sampling.cfg_scale``.
        label_dropout: probability that a training sample's class is replaced by the null class (its caption by the
            empty caption, for a text-conditioned teacher) (one draw per
            sample from the training draws; an L2C pair keeps it for its full step and both calls, a HarmoniCa
            trajectory for all its calls). None takes the mode's reference: L2C 0.1 (its DiT trains in train mode,
            ``dropout_prob=0.1``), HarmoniCa 0 (its DiT trains in eval mode). 0 draws nothing.
    """

    mode: Literal["harmonica", "l2c"] = "harmonica"
    threshold: float = 0.1
    sparsity: float = 1e-4
    clamp: float = 5.0
    init: Literal["normal", "constant"] = "normal"
    init_value: float = 0.0
    seed: int = 0
    train_cfg_scale: float | None = None
    label_dropout: float | None = None

    @property
    def label_dropout_rate(self) -> float:
        """``label_dropout``, or the mode's reference when it is None."""
        return LABEL_DROPOUT[self.mode] if self.label_dropout is None else float(self.label_dropout)


class CacheRouterModule(FromTeacher, DiffusionModule):
    """Trains a step x unit router on a frozen teacher; see ``RouterConfig`` and the module notes.

    Args:
        teacher: the frozen backbone (a ditlab run, a public DiT file, a diffusers folder, or a cached recipe).
        router: mode, threshold, sparsity weight, clamp and initialisation.
        objective: used only for teachers that do not record one.
        sampling: the sampler, steps and guidance the router is trained for (and sampled with); None takes the
            teacher's.
        lr: AdamW learning rate of the router (L2C: 1e-3, HarmoniCa: 1e-2).
        weight_decay: AdamW weight decay (L2C: 0).
        betas: AdamW betas.
        warmup_steps: linear learning-rate warm-up.
        log_router_every: log the router image every this many steps (0: only at the end).
    """

    builds_own_network = True

    def __init__(
        self,
        teacher: TeacherConfig = TeacherConfig(),
        router: RouterConfig = RouterConfig(),
        objective: ObjectiveConfig = ObjectiveConfig(),
        sampling: SamplingConfig | None = None,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        log_router_every: int = 50,
    ) -> None:
        if not 0.0 <= router.threshold < 1.0:
            raise ValueError(f"model.router.threshold={router.threshold} must be in [0, 1), e.g. 0.1")
        if router.sparsity < 0 or router.clamp <= 0:
            raise ValueError(f"model.router.sparsity={router.sparsity} must be >= 0 and model.router.clamp="
                             f"{router.clamp} > 0")  # fmt: skip
        if not 0.0 <= router.label_dropout_rate < 1.0:
            raise ValueError(f"model.router.label_dropout={router.label_dropout} must be in [0, 1) (L2C: 0.1; "
                             "null: the mode's reference)")  # fmt: skip
        super().__init__(objective=objective, sampling=sampling or SamplingConfig(), lr=lr, weight_decay=weight_decay,
                         betas=betas, warmup_steps=warmup_steps, ema_decay=None)  # fmt: skip
        self.automatic_optimization = False
        self.teacher_config, self.router_config = teacher, router
        self.log_router_every = log_router_every
        self.hold_teacher(sampling is not None)
        self.router: StepUnitRouter | None = None
        self.weights: torch.Tensor | None = None
        """Per-step loss weights (the image-error proxy, normalised); ones until the proxy is first computed."""
        self.rollout: Trajectory | None = None
        """The HarmoniCa training trajectory in progress (this process's rows) and the cache it carries."""
        self.rollout_cache: Cache = {}
        self.rollout_labels = None
        """The rollout's conditions as drawn (labels, or captions before encoding: what a checkpoint stores)."""

    # ----------------------------------------------------------------------------------- building
    @property
    def sampler(self) -> str:
        return self.sampling.sampler or self.objective.default_sampler

    def configure_model(self) -> None:
        """Load the teacher and build the router for the sampler's schedule (once)."""
        if self.router is not None:
            return
        teacher = self.teacher
        self.objective = self.objective_config.build(teacher.learn_sigma)
        given = self.teacher_config
        check_teacher_sampler(self.objective, self.sampling.sampler, given.checkpoint or f"built from {given.recipe}")
        calls = len(self.schedule())
        mode = self.router_config.mode
        if calls < 2:
            raise ValueError(f"model.sampling.steps={self.sampling.steps}: a router needs at least 2 model calls")
        if mode == "l2c" and self.sampler not in PAIR_SAMPLERS:
            raise ValueError(f"router mode l2c builds each pair from one full step, which {self.sampler} cannot "
                             f"take alone; use sampling.sampler {' or '.join(PAIR_SAMPLERS)}, or mode harmonica")  # fmt: skip
        config = self.router_config
        table = getattr(teacher.y_embedder, "embedding_table", None)
        if config.label_dropout_rate > 0 and table is not None and table.num_embeddings <= teacher.num_classes:
            raise ValueError(f"model.router.label_dropout={config.label_dropout_rate} drops labels to the null class, "
                             "which this teacher lacks (trained without class drop-out); set "
                             "model.router.label_dropout 0")  # fmt: skip
        frozen = list(range(0, calls, 2)) if mode == "l2c" else [0]
        self.router = StepUnitRouter(calls, teacher.depth, frozen, config.clamp, config.init, config.init_value,
                                     config.seed, units=len(teacher.units())).to(self.device)  # fmt: skip
        self.weights = torch.ones(calls)

    def schedule(self) -> torch.Tensor:
        """Network time of every model call of the trajectory the router is trained for."""
        return schedule_times(self.objective, **trajectory_options(self.sampling))

    def new_trajectory(self, noise: torch.Tensor, labels) -> Trajectory:
        """A trajectory of the schedule and guidance the router trains for, from ``noise`` (``train_cfg_scale``), for
        ``labels`` (class labels, captions, encoded here by the teacher's text encoder, or ``TextFeatures``)."""
        scale = self.router_config.train_cfg_scale
        scale = self.sampling.cfg_scale if scale is None else scale
        teacher = self.teacher
        return Trajectory(self.objective, noise, encode_conditions(teacher, labels, self.device),
                          null_label=null_label_of(teacher), **trajectory_options(self.sampling, cfg_scale=scale))  # fmt: skip

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [self.router.theta]

    @property
    def sampling_network(self) -> DiT:
        return self.teacher

    def num_parameters(self) -> int:
        """Trained parameters: the router's (the backbone is frozen and not saved)."""
        return self.router.theta.numel() if self.router is not None else 0

    # ----------------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0]
        if self.router_config.mode == "l2c":
            terms, index = self.pair_terms(images, batch_conditions(self.teacher, batch, "Learning-to-Cache"))
        else:
            terms, index = self.rollout_terms(len(images))
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(terms["loss"])
        optimizer.step()
        schedule.step()
        self.router.clamp_()
        self.log_terms(terms, index, len(images))
        return terms["loss"].detach()

    def draws(self) -> torch.Generator:
        return self.training_generator(self.device)

    def step_terms(self, trajectory: Trajectory, cache: Cache) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Teacher and routed student at the trajectory's call on the same sample; the loss terms and the student's
        raw output."""
        inputs = trajectory.inputs()
        with torch.no_grad():
            target = self.teacher(*inputs)
        scores = self.router.scores()[trajectory.index]
        student = routed_call(self.teacher, *inputs, scores, cache, self.router_config.threshold)
        mse = F.mse_loss(student, target)
        sparsity = scores.sum()
        weight = self.weights[trajectory.index].to(mse)
        loss = weight * mse + self.router_config.sparsity * sparsity
        return {"loss": loss, "mse": mse.detach(), "sparsity": sparsity.detach(), "weight": weight}, student.detach()

    def rollout_terms(self, batch_size: int) -> tuple[dict[str, torch.Tensor], int]:
        """HarmoniCa SDT: train the next call of the current trajectory (starting one when none is open)."""
        if self.rollout is None or self.rollout.done:
            self.start_rollout(batch_size)
        rollout, index = self.rollout, self.rollout.index
        terms, student = self.step_terms(rollout, self.rollout_cache)
        rollout.step(student)  # the student's prediction moves it
        return terms, index

    @torch.no_grad()
    def start_rollout(self, batch_size: int) -> None:
        """Noise and random classes or training captions (this process's rows of the global draw), then call 0 in full
        (fills the cache)."""
        teacher, generator = self.teacher, self.draws()
        rank, world_size = data_parallel_split(self._trainer)
        shape = (teacher.in_channels, teacher.input_size, teacher.input_size)
        noise = draw_rows(lambda n: torch.randn(n, *shape, device=self.device, generator=generator), batch_size, rank,
                          world_size)  # fmt: skip
        labels = draw_conditions(teacher, generator, batch_size, self.device, rank, world_size)
        labels = self.drop_labels(labels, generator, rank, world_size)
        self.rollout, self.rollout_cache = self.new_trajectory(noise, labels), {}
        self.rollout_labels = labels
        self.advance_in_full(self.rollout, self.rollout_cache)

    def drop_labels(self, labels, generator: torch.Generator, rank: int = 0, world_size: int = 1):
        """``labels`` with each replaced by the null class with probability ``label_dropout`` (this process's rows
        of one global draw, so the process count does not change which are dropped); no draw when it is 0."""
        rate = self.router_config.label_dropout_rate
        if rate == 0:
            return labels
        device = labels.device if isinstance(labels, torch.Tensor) else self.device
        draws = draw_rows(lambda n: torch.rand(n, device=device, generator=generator), len(labels), rank,
                          world_size)  # fmt: skip
        return drop_conditions(labels, draws < rate, self.teacher.num_classes)

    @torch.no_grad()
    def advance_in_full(self, trajectory: Trajectory, cache: Cache) -> None:
        """One call computing every unit (a frozen row): refreshes the whole cache and moves the sample."""
        scores = self.router.scores()[trajectory.index]
        trajectory.step(routed_call(self.teacher, *trajectory.inputs(), scores, cache, 0.0))

    def pair_terms(self, images: torch.Tensor, labels) -> tuple[dict[str, torch.Tensor], int]:
        """L2C: a real image noised to the full call before a random cached call, one full step, then the pair
        (``labels``: the images' classes, or their captions for a text-conditioned teacher)."""
        generator = self.draws()
        rank, world_size = data_parallel_split(self._trainer)
        cached_calls = torch.arange(1, self.router.calls, 2)
        pick = torch.randint(len(cached_calls), (1,), generator=generator, device=self.device)
        index = int(cached_calls[int(pick)])
        labels = self.drop_labels(labels, generator, rank, world_size)  # L2C: drawn before the noise, for the pair
        noise = draw_rows(lambda n: torch.randn(n, *images.shape[1:], device=self.device, generator=generator),
                          len(images), rank, world_size)  # fmt: skip
        trajectory, cache = self.new_trajectory(noise, labels), {}
        trajectory.index = index - 1
        time = torch.as_tensor(trajectory.time).to(self.device).expand(len(images))
        trajectory.x = self.objective.add_noise(images, time, noise)
        self.advance_in_full(trajectory, cache)
        terms, _ = self.step_terms(trajectory, cache)
        return terms, index

    def validation_step(self, batch, batch_idx: int) -> None:
        """Nothing to validate on data: the router is judged by sampling (``bench/learned_caching.py``)."""

    # ----------------------------------------------------------------------------------- proxy and logging
    @torch.no_grad()
    def refresh_weights(self, samples: int, seed: int) -> torch.Tensor:
        """Recompute the image-error proxy with the current router on ``samples`` fixed-seed trajectories."""
        teacher = self.teacher
        generator = torch.Generator().manual_seed(seed)
        shape = (samples, teacher.in_channels, teacher.input_size, teacher.input_size)
        noise = torch.randn(shape, generator=generator).to(self.device)
        labels = encode_conditions(teacher, draw_conditions(teacher, generator, samples, "cpu"), self.device)
        proxy = image_error_proxy(teacher, self.new_trajectory, self.router.scores().detach(), noise, labels,
                                  self.router_config.threshold)  # fmt: skip
        self.weights = loss_weights(proxy.cpu(), ~self.router.frozen.cpu())
        return proxy

    def log_terms(self, terms: dict[str, torch.Tensor], index: int, batch_size: int) -> None:
        values = {f"train/{name}": value.detach() for name, value in terms.items()}
        values["train/call"] = float(index)
        values["router/computed_fraction"] = self.router.computes(self.router_config.threshold).float().mean()
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=batch_size, sync_dist=True)
        every = self.log_router_every
        if every and self.global_step % every == 0:
            self.log_router_image()

    def on_train_end(self) -> None:
        self.log_router_image()

    def log_router_image(self) -> None:
        """The router as images, rows = sampling steps (first at the top), columns = units (attention, MLP, ...)."""
        experiment = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if self.global_rank != 0 or not hasattr(experiment, "add_image"):
            return
        scores = self.router.scores().detach().cpu()
        for name, image in (("router/scores", scores), ("router/computed", (scores > self.router_config.threshold).float())):
            large = image.repeat_interleave(8, 0).repeat_interleave(8, 1)
            experiment.add_image(name, large[None], global_step=self.global_step)

    # ----------------------------------------------------------------------------------- export and sampling
    def export(self, threshold: float | None = None, path: str | Path | None = None) -> StaticPlan:
        """The router at ``threshold`` (default the training one) as a static plan; saved to ``path`` if given."""
        threshold = self.router_config.threshold if threshold is None else threshold
        plan = StaticPlan(self.router.computes(threshold).cpu().tolist(), self.schedule().tolist(), self.sampler,
                          self.sampling.steps, self.teacher.depth, threshold, source=self.teacher_config.checkpoint or "")
        if path is not None:
            plan.save(path)
        return plan

    def sample(self, labels: torch.Tensor, seed: int = 0, start: int = 0, show_progress: bool = False,
               network: DiT | None = None, threshold: float | None = None, **overrides) -> torch.Tensor:  # fmt: skip
        """Images sampled by the teacher through the exported plan (the schedule it was trained for; another is
        refused in one line). ``sampling.cache`` must be none: the plan is the cache."""
        return super().sample(labels, seed, start, show_progress, network, factory=plan_factory(self.export(threshold)),
                              **overrides)  # fmt: skip

    @classmethod
    def checkpoint_bundle(cls, checkpoint: dict, use_ema: bool = True) -> Bundle:
        """What ``ditlab sample --ckpt ROUTER.ckpt`` samples: the recorded teacher through the router's plan, with the
        schedule and guidance the router was trained for (``use_ema``: a router has no EMA copy)."""
        plan = plan_from_checkpoint(checkpoint)
        what = f"its {plan.meta['mode']} router's plan ({plan.computed_fraction:.0%} of the units computed)"
        bundle = through_teacher(checkpoint, plan_factory(plan), what)
        if "ditlab" not in checkpoint:  # written before routers recorded their settings: the schedule it saved
            saved = checkpoint["cache_router"]
            sampling = replace(bundle.sampling, sampler=saved["sampler"], steps=saved["steps"], cfg_scale=saved["cfg_scale"])
            bundle = replace(bundle, sampling=sampling)
        return bundle

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The router alone in ``state_dict``; the schedule it belongs to and the training state beside it."""
        rollout = None
        if self.rollout is not None and not self.rollout.done:
            rollout = {"x": self.rollout.x, "labels": saved_conditions(self.rollout_labels), "index": self.rollout.index,
                       "cache": [[block, kind, value] for (block, kind), value in self.rollout_cache.items()]}  # fmt: skip
        checkpoint["ditlab"] = self.sampled_entry()
        checkpoint["cache_router"] = {
            "mode": self.router_config.mode, "sampler": self.sampler, "steps": self.sampling.steps,
            "times": self.schedule().tolist(), "depth": self.teacher.depth,
            "threshold": self.router_config.threshold, "teacher": str(teacher_path(self.teacher_config)),
            "cfg_scale": self.sampling.cfg_scale, "weights": self.weights, "rollout": rollout,
            "training_draws": self._draws.get_state() if self._draws is not None else None,
        }  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a router trained for another schedule; restore the proxy weights, trajectory and draws."""
        saved = checkpoint.get("cache_router")
        if saved is None:
            raise ValueError("this checkpoint holds no cache router (no 'cache_router' entry); resume a "
                             "CacheRouterModule run's checkpoint")  # fmt: skip
        check_schedule(saved, self.sampler, self.sampling.steps, self.schedule().tolist())
        self.weights = saved["weights"]
        self._draws, self._pending_draws = None, saved["training_draws"]
        self.rollout, self.rollout_cache = None, {}
        if saved["rollout"] is not None:
            state = saved["rollout"]
            x, labels = state["x"].to(self.device), loaded_conditions(state["labels"], self.device)
            self.rollout, self.rollout_labels = self.new_trajectory(x, labels), labels
            self.rollout.x, self.rollout.index = x, state["index"]
            self.rollout_cache = {(block, kind): value.to(self.device) for block, kind, value in state["cache"]}

