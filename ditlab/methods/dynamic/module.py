"""``DynamicModule``: fine-tune a trained DiT (or train one from scratch) into a dynamic-compute network.

The network is the teacher's architecture with a dynamic trunk (``dydit``, ``elastic`` or ``chunking``), its
plain weights copied from the teacher and its routers freshly initialised so that at the start every head,
group, token and block is on. One batch gives, as configured:

- the diffusion loss of the dynamic network (hard straight-through masks);
- the FLOPs-target loss ``w (mean_batch r - lambda(step))^2`` with ``r`` the block FLOPs ratio the trunk measured
  from the components' own ``macs`` (DyDiT: ``w = 2``); ``lambda = 1 - (1 - target) step / warmup`` from step 0,
  held at 1 before ``target_hold_steps`` and at the target after the warm-up (DyDiT's ``train.py``);
- the complete-model loss: the same ``x_t`` through every block (DyDiT's stage 1), for ``complete_model_steps``;
- Elastic-DiT's budget losses: ``(mean_l p - tau(t))^2`` with ``tau`` linear in the noise level, and
  ``(rho_bar - rho*)^2`` over the open blocks;
- DC-DiT's ratio loss (H-Net) towards a ``chunk_target``-fold shorter sequence.

Timesteps are stratified (the batch split evenly over ``strata`` ranges of the noise schedule, DyDiT). There is
one optimiser step per update (Lightning's; gradient clipping is ``trainer.gradient_clip_val``): DyDiT's released
``train.py`` steps twice (before and after clipping). Sampling, the ``Evaluation`` callback and checkpoints use
the exported, sliced form (:func:`~ditlab.methods.dynamic.export.export`).

DyDiT's lambda schedule and FLOPs ratio were checked against the authors' release (kawgit/DyDiT at the authors'
commit 0ddc5097d2bc38c9b68b6c32ac6b53adadc1f865, ``train.py`` and ``loss.py``): ``tests/methods/dynamic/
test_dydit_reference.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.diffusion.gaussian import Noised
from ditlab.methods.base import DiffusionModule
from ditlab.methods.dynamic.export import dynamic_trunk, export
from ditlab.methods.teacher import FromTeacher, Teacher, TeacherConfig
from ditlab.models.dit import DiT

TRUNKS = ("dydit", "elastic", "chunking")


@dataclass
class DynamicConfig:
    """What is made dynamic and how it is trained.

    Args:
        trunk: ``dydit``, ``elastic`` or ``chunking``.
        trunk_options: options of the trunk (groups, temperature, widths, router_bias, smoothing, ...).
        init: ``teacher`` copies the teacher's weights (fine-tuning, upcycling); ``scratch`` only its architecture.
        freeze: parameter-name prefixes of the network kept as they start (no gradient, not in the optimiser);
            DC-DiT's upcycling freezes the timestep and class embedders: ``[t_embedder, y_embedder]``.
        flops_target: the FLOPs ratio lambda in (0, 1] the FLOPs loss pulls towards (DyDiT: 0.7 or 0.5).
        flops_weight: weight of the FLOPs loss (DyDiT: 2; 0 turns it off).
        target_hold_steps: steps held at lambda = 1 (DyDiT: 100); the fall is still counted from step 0.
        target_warmup_steps: lambda reaches ``flops_target`` at this step, linearly from 1 at step 0 (DyDiT's
            lambda-0.7 recipe: 5000; its lambda-0.5 recipe leaves ``--warmup_step`` at its default, 1000).
        complete_model_steps: steps with the complete-model loss (None: all; 0: never; DyDiT lambda 0.5: stage 1).
        strata: stratified timesteps over this many equal ranges (DyDiT: 4; 1 turns it off). Row ``i`` of ``B``
            falls in range ``i * strata // B``, so with DC-DiT's ratio loss (groups of ``ratio_group`` consecutive
            rows) each group sees one range and the ratio is enforced per range, which DC-DiT's uniform timesteps
            (its ``train.py``) do not do: DC-DiT uses 1.
        keep_high, keep_low: Elastic-DiT's open-block targets at the data end and the noise end.
        width_target: Elastic-DiT's target mean MLP width of open blocks (rho*).
        budget_weight: weight of Elastic-DiT's budget losses (0 turns them off).
        chunk_target: DC-DiT's downsampling factor N of the ratio loss.
        ratio_weight: weight of DC-DiT's ratio loss (DC-DiT: 0.03).
        ratio_group: samples per group of the ratio loss (DC-DiT: 16).
        router_lr_scale: the routers' learning rate over the backbone's.
    """

    trunk: str = "dydit"
    trunk_options: dict[str, Any] = field(default_factory=dict)
    init: str = "teacher"
    freeze: list[str] = field(default_factory=list)
    flops_target: float = 0.5
    flops_weight: float = 2.0
    target_hold_steps: int = 100
    target_warmup_steps: int = 5000
    complete_model_steps: int | None = None
    strata: int = 4
    keep_high: float = 1.0
    keep_low: float = 0.5
    width_target: float = 0.75
    budget_weight: float = 1.0
    chunk_target: float = 2.0
    ratio_weight: float = 0.03
    ratio_group: int = 16
    router_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.trunk not in TRUNKS:
            raise ValueError(f"model.dynamic.trunk={self.trunk!r}; choices: {list(TRUNKS)}")
        if self.init not in ("teacher", "scratch"):
            raise ValueError(f"model.dynamic.init={self.init!r}; choices: ['teacher', 'scratch']")
        for name in ("flops_target", "keep_high", "keep_low", "width_target"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"model.dynamic.{name}={value} must be in (0, 1] (a fraction of the full compute)")
        if self.strata < 1:
            raise ValueError(f"model.dynamic.strata={self.strata} must be >= 1 (1: plain uniform timesteps)")
        self.trunk_options = dict(self.trunk_options)
        self.freeze = list(self.freeze)

    def target_at(self, step: int) -> float:
        """lambda at optimiser step ``step``: ``1 - (1 - target) step / warmup`` (the fall counted from step 0, as
        DyDiT computes it), 1 before ``target_hold_steps``, ``flops_target`` after the warm-up."""
        if step < self.target_hold_steps:
            return 1.0
        progress = min(1.0, step / max(1, self.target_warmup_steps))
        return 1.0 - (1.0 - self.flops_target) * progress


class DynamicModule(FromTeacher, DiffusionModule):
    """Trains a dynamic-compute DiT from a teacher; see :class:`DynamicConfig` and the module docstring.

    Args:
        teacher: the trained DiT the network starts from (a checkpoint, or a recipe trained once and cached).
        dynamic: what is made dynamic and its losses.
        objective: used only for teachers that do not record one.
        sampling: sampling settings for grids and metrics; None takes the teacher's.
    """

    builds_own_network = True

    def __init__(self, teacher: TeacherConfig = TeacherConfig(), dynamic: DynamicConfig = DynamicConfig(),
                 objective: ObjectiveConfig = ObjectiveConfig(), sampling: SamplingConfig | None = None,
                 **options) -> None:  # fmt: skip
        super().__init__(objective=objective, sampling=sampling or SamplingConfig(), **options)
        self.teacher_config, self.dynamic = teacher, dynamic
        self.hold_teacher(sampling is not None)
        self._exported: tuple[int, DiT] | None = None

    # ----------------------------------------------------------------------------------- building
    def check_teacher(self, loaded: Teacher) -> None:
        if not loaded.network.trunk.block_loop:
            raise ValueError(f"teacher {loaded.source} already routes its blocks (trunk {loaded.network.config.trunk!r}); "
                             "start from a plain DiT checkpoint, or sample/export the dynamic one as it is")  # fmt: skip

    def configure_model(self) -> None:
        if self.network is None:
            self.attach(self.build_dynamic(self._teacher.get(self.device)).train())
            self._teacher.release()
        super().configure_model()

    def build_dynamic(self, teacher: DiT) -> DiT:
        """The teacher's architecture with the dynamic trunk; its plain weights copied (``init: teacher``)."""
        config = teacher.config.replace(trunk=self.dynamic.trunk, trunk_options=self.dynamic.trunk_options)
        network = DiT(config).to(teacher.pos_embed.device)
        if self.dynamic.init == "teacher":
            missing, unexpected = network.load_state_dict(teacher.state_dict(), strict=False)
            if unexpected or any(not key.startswith("trunk.") for key in missing):
                raise ValueError(f"teacher weights do not fit the dynamic network: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")  # fmt: skip
        for prefix in self.dynamic.freeze:
            named = [p for name, p in network.named_parameters() if name == prefix or name.startswith(prefix + ".")]
            if not named:
                raise ValueError(f"model.dynamic.freeze names {prefix!r}, which is no module of the network; e.g. "
                                 "t_embedder, y_embedder, blocks.0")  # fmt: skip
            for parameter in named:
                parameter.requires_grad_(False)
        return network

    def trainable_parameters(self) -> list:
        return [p for p in self.network.parameters() if p.requires_grad]

    def configure_optimizers(self):
        """AdamW with the routers at ``router_lr_scale`` times the learning rate, linear warm-up."""
        trunk = [p for p in self.network.trunk.parameters() if p.requires_grad]
        routed = {id(p) for p in trunk}
        backbone = [p for p in self.trainable_parameters() if id(p) not in routed]
        groups = [{"params": backbone}, {"params": trunk, "lr": self.lr * self.dynamic.router_lr_scale}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        warmup = max(1, self.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----------------------------------------------------------------------------------- training
    def stratify(self, noised: Noised, images: torch.Tensor) -> Noised:
        """Timesteps spread evenly over ``strata`` ranges: row ``i`` of ``B`` falls in range ``i * K // B``; the
        draw within the range is the objective's own (uniform) draw folded into it."""
        strata = self.dynamic.strata
        if strata == 1:
            return noised
        t = noised.t
        stratum = torch.arange(len(t), device=t.device) * strata // len(t)
        if t.is_floating_point():
            folded = (stratum + torch.frac(t * strata)) / strata
        else:
            width = self.objective.num_timesteps // strata
            folded = stratum * width + torch.remainder(t, width)
        return Noised(self.objective.add_noise(images, folded, noised.noise), folded, self.objective.model_time(folded),
                      noised.noise)  # fmt: skip

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        noised, drop = self.training_draws(images, labels)
        noised = self.stratify(noised, images)
        trunk, cfg, step = dynamic_trunk(self.network), self.dynamic, self.global_step
        output = self.network(noised.xt, noised.model_t, labels, force_drop_ids=drop)
        decisions = trunk.last
        terms = self.objective.losses(output, images, noised)
        loss = terms["loss"]
        ratio = decisions.ratio.mean()
        target = cfg.target_at(step)
        terms["flops_ratio"], terms["flops_target"] = ratio.detach(), torch.tensor(target)
        if cfg.flops_weight:
            terms["loss_flops"] = cfg.flops_weight * (ratio - target) ** 2
            loss = loss + terms["loss_flops"]
        own = trunk.budget_terms(decisions, cfg, lambda: self.noise_levels(noised.t))  # the trunk kind's own losses
        terms.update(own)
        for name, value in own.items():
            loss = loss + value if name.startswith("loss_") else loss
        if cfg.complete_model_steps is None or step < cfg.complete_model_steps:
            trunk.dense = True
            try:
                full = self.network(noised.xt, noised.model_t, labels, force_drop_ids=drop)
            finally:
                trunk.dense = False
            terms["loss_complete"] = self.objective.losses(full, images, noised)["loss"]
            loss = loss + terms["loss_complete"]
        terms["loss"] = loss
        return terms

    def noise_levels(self, t: torch.Tensor) -> torch.Tensor:
        """Where each timestep lies between data (0) and noise (1)."""
        return torch.tensor([self.objective.noise_level(v) for v in t.tolist()], device=t.device)

    # ----------------------------------------------------------------------------------- sampling and logging
    @property
    def sampling_network(self) -> DiT:
        """The exported (sliced) form of the EMA network, re-exported when the weights moved on."""
        source = self.ema if self.ema is not None else self.network
        version = (self.global_step, sum(p._version for p in source.parameters()))
        if self._exported is None or self._exported[0] != version:
            steps = getattr(self.objective, "num_timesteps", 1000)
            self._exported = (version, export(source, steps))
        return self._exported[1]

    def on_validation_epoch_end(self) -> None:
        """TensorBoard: the per-timestep width table of DyDiT (rows: blocks' heads then groups; columns: t)."""
        experiment = getattr(self.logger, "experiment", None) if self._trainer is not None else None
        if not hasattr(experiment, "add_image") or not hasattr(dynamic_trunk(self.network), "width_table"):
            return
        image = width_table_image(self.sampling_network)
        experiment.add_image("dynamic/width_table", image, self.global_step)


def width_table_image(network: DiT) -> torch.Tensor:
    """``(1, 2L, T)`` image in [0, 1]: per block, the fraction of heads (top L rows) and channel groups (bottom
    L rows) on at each timestep of the exported table."""
    table = dynamic_trunk(network).width_table
    if table is None:
        raise ValueError("the width table exists on an exported DyDiT network; call export(network) first")
    heads = network.trunk.num_heads
    on_heads = table[..., :heads].float().mean(-1)
    on_groups = table[..., heads:].float().mean(-1)
    return torch.cat([on_heads, on_groups], dim=1).T.unsqueeze(0).cpu()


__all__ = ["DynamicConfig", "DynamicModule", "width_table_image"]
