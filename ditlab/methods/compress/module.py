"""``DicompModule``: compress a trained DiT into a shallower (and optionally narrower) student, then distil.

The recipe follows the compression papers in ``shared/methods/compression.md``: choose the blocks to keep
with an importance criterion (PPCL's contiguous-interval probes, LAPTOP-Diff's one-shot output loss,
Amber-Image's timestep sensitivity, or a baseline), build the student from the teacher's weights (copy,
Amber-style local averaging, or re-initialisation; optional width pruning), and train it with the
diffusion loss on data plus output and block-feature distillation from the frozen teacher (PPCL /
LAPTOP-Diff losses, teacher-forced or not). ``ProgressiveDistillation`` shrinks it further in stages.

The teacher is never saved in checkpoints; a checkpoint records the student's architecture and which
teacher blocks it stands for, so a resumed run (even past a progressive stage) rebuilds the same student.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from ditlab.checkpoint import run_settings
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.distributed import gathered, is_sharded
from ditlab.methods.base import DiffusionModule
from ditlab.methods.compress.analysis import select_blocks
from ditlab.methods.compress.distill import FEATURE_LOSSES, distillation_losses
from ditlab.methods.compress.prune import prune_depth, prune_width
from ditlab.methods.frozen import FrozenNetwork
from ditlab.methods.teacher import TeacherConfig, build_from_recipe, load_teacher
from ditlab.models.budget import activated_parameter_count, flops_per_image, parameter_count
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT


@dataclass
class PruneConfig:
    """How the student is cut from the teacher.

    Args:
        criterion: block importance: laptop | amber | ppcl | random | first | last.
        num_blocks: student depth after the initial cut (progressive stages may cut further).
        init: kept-block weights: copy (the kept block), average (Amber local averaging with the blocks it
            replaces) or random (re-initialised, an ablation).
        calibration_images: training images used to score blocks.
        num_timesteps: noise levels the criteria average (or, for amber, bin) over.
        seed: calibration noise and the random baseline.
        num_heads: attention heads kept per block (width pruning); None keeps all.
        mlp_hidden: MLP channels kept per block; None keeps all.
        width_score: magnitude or taylor scores for width pruning.
    """

    criterion: Literal["laptop", "amber", "ppcl", "random", "first", "last"] = "laptop"
    num_blocks: int = 6
    init: Literal["copy", "average", "random"] = "copy"
    calibration_images: int = 256
    num_timesteps: int = 8
    seed: int = 0
    num_heads: int | None = None
    mlp_hidden: int | None = None
    width_score: Literal["magnitude", "taylor"] = "magnitude"


@dataclass
class DistillConfig:
    """Loss weights: ``loss = task * L_diffusion + output * ||out_S - out_T||^2 + feature * L_feature``.

    Args:
        task_weight: the ordinary diffusion loss on data (0 for pure distillation).
        output_weight: output distillation (all output channels).
        feature_weight: block-feature distillation between each student block and the teacher block ending
            its segment.
        feature_loss: mse | normalized_mse (LAPTOP-Diff) | direction (PPCL) | cosine | normalized_l1.
        teacher_forced: feed each student block the teacher's input to its segment (PPCL's local phase).
    """

    task_weight: float = 1.0
    output_weight: float = 1.0
    feature_weight: float = 1.0
    feature_loss: str = "normalized_mse"
    teacher_forced: bool = False


def criterion_options(criterion: str) -> dict:
    """PPCL keeps each redundant interval's *first* block, so the student block's segment (the blocks it stands
    for, ``prune.segments``) is exactly PPCL's interval and feature distillation matches ``h_s -> h_{e+1}``."""
    return {"representative": "start"} if criterion == "ppcl" else {}


class DicompModule(DiffusionModule):
    """Prunes a teacher DiT into a student and distils it; see the config dataclasses for every option.

    Args:
        teacher: where the teacher comes from (a checkpoint, or a recipe trained once and cached).
        prune: block selection, student depth, re-initialisation and width pruning.
        distill: loss weights and the feature loss.
        objective: used only for teachers that do not record one (public DiT / diffusers files).
        sampling: sampling settings for grids and metrics; None takes the teacher's.
        options: every other ``DiffusionModule`` option (lr, warmup, EMA, compile, checkpointing, ...).
    """

    def __init__(
        self,
        teacher: TeacherConfig = TeacherConfig(),
        prune: PruneConfig = PruneConfig(),
        distill: DistillConfig = DistillConfig(),
        objective: ObjectiveConfig = ObjectiveConfig(),
        sampling: SamplingConfig | None = None,
        **options,
    ) -> None:
        if distill.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"model.distill.feature_loss={distill.feature_loss!r}; choices: {list(FEATURE_LOSSES)}")
        if prune.num_blocks < 1:
            raise ValueError(f"model.prune.num_blocks={prune.num_blocks} must be at least 1")
        super().__init__(objective=objective, sampling=sampling or SamplingConfig(), **options)
        self.teacher_config, self.prune, self.distill = teacher, prune, distill
        self._sampling_given = sampling is not None
        self._teacher = FrozenNetwork(self._load_teacher)
        self.keep: list[int] = []
        """Teacher block index behind each student block (the kept block of its segment)."""
        self.calibration: tuple[torch.Tensor, torch.Tensor] | None = None

    # ----------------------------------------------------------------------------------- building
    builds_own_network = True

    def prepare_data(self) -> None:
        """Train the teacher recipe once (cached) when no teacher file is given; runs on one process per node."""
        if not self.teacher_config.checkpoint:
            build_from_recipe(self.teacher_config)

    @property
    def teacher(self) -> DiT:
        """The frozen teacher on this module's device (read from its file on first use; never trained here)."""
        return self._teacher.get(self.device)

    def _load_teacher(self) -> DiT:
        loaded = load_teacher(self.teacher_config, self.objective_config, self.sampling)
        self.objective_config = loaded.objective
        if not self._sampling_given:
            self.sampling = loaded.sampling
        return loaded.network

    def configure_model(self) -> None:
        """Build the student once the trainer (and its datamodule, for calibration images) is attached."""
        if self.network is None:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            images, labels = self.calibration_batch(datamodule)
            self.build_student(images, labels)
        super().configure_model()

    def calibration_batch(self, datamodule) -> tuple[torch.Tensor, torch.Tensor]:
        """``prune.calibration_images`` training images and labels (digits when there is no datamodule)."""
        wanted = self.prune.calibration_images
        if datamodule is None:
            from ditlab.data.digits import digits_tensors

            images, labels = digits_tensors(self.teacher.input_size)
            return images[:wanted], labels[:wanted]
        datamodule.setup("fit")
        generator = torch.Generator().manual_seed(self.prune.seed)
        batches, count = [], 0
        loader = torch.utils.data.DataLoader(datamodule.train_dataloader().dataset, batch_size=256, shuffle=True,
                                             generator=generator)  # fmt: skip
        for images, labels in loader:
            batches.append((images, labels))
            count += len(images)
            if count >= wanted:
                break
        images = torch.cat([b[0] for b in batches])[:wanted]
        return images, torch.cat([b[1] for b in batches])[:wanted]

    def build_student(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Select blocks on the teacher, cut the student from it and start training it."""
        teacher = self.teacher
        if self.prune.num_blocks > teacher.depth:
            raise ValueError(f"model.prune.num_blocks={self.prune.num_blocks} exceeds the teacher's depth "
                             f"{teacher.depth}; choose at most {teacher.depth}")  # fmt: skip
        self.calibration = (images, labels)
        objective = self.objective_config.build(teacher.learn_sigma)
        selection = select_blocks(teacher, objective, images.to(self.device), labels.to(self.device),
                                  self.prune.criterion, self.prune.num_blocks, seed=self.prune.seed,
                                  num_timesteps=self.prune.num_timesteps,
                                  **criterion_options(self.prune.criterion))  # fmt: skip
        student = prune_depth(teacher, selection.keep, init=self.prune.init)
        if self.prune.num_heads is not None or self.prune.mlp_hidden is not None:
            student = prune_width(student, num_heads=self.prune.num_heads, mlp_hidden=self.prune.mlp_hidden,
                                  score=self.prune.width_score)  # fmt: skip
        self.keep = list(selection.keep)
        self.attach(student.train())
        self.summary["selection"] = {"criterion": selection.criterion, "keep": self.keep,
                                     "scores": [round(float(s), 6) for s in selection.scores]}  # fmt: skip

    def shrink(self, num_blocks: int, criterion: str | None = None, init: str | None = None) -> list[int]:
        """Cut the current student to ``num_blocks`` (a progressive stage); returns the student blocks kept.

        Every process must call it (a sharded student is gathered first); the caller rebuilds the optimiser and,
        under DDP, the wrapper (``ditlab.callbacks.progressive``).
        """
        if not 1 <= num_blocks <= self.network.depth:
            raise ValueError(f"cannot shrink a {self.network.depth}-block student to {num_blocks} blocks")
        images, labels = self.calibration
        network, ema = self.network, self.ema
        if is_sharded(self):  # cut whole copies (every process), then shard the new student below
            network, ema = gathered(network), gathered(ema) if ema is not None else None
        criterion = criterion or self.prune.criterion
        selection = select_blocks(network, self.objective, images.to(self.device), labels.to(self.device),
                                  criterion, num_blocks, seed=self.prune.seed, num_timesteps=self.prune.num_timesteps,
                                  **criterion_options(criterion))  # fmt: skip
        init = init or self.prune.init
        student = prune_depth(network, selection.keep, init=init).train()
        ema = prune_depth(ema, selection.keep, init=init) if ema is not None else None
        self.keep = [self.keep[i] for i in selection.keep]
        self.attach(student, ema)
        self.reconfigure()  # checkpointing, compile and sharding for the new blocks
        return list(selection.keep)

    # ----------------------------------------------------------------------------------- training
    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        noised, drop = self.training_draws(images, labels)
        terms, output = distillation_losses(
            self.network, self.teacher, noised.xt, noised.model_t, labels, self.keep,
            output_weight=self.distill.output_weight, feature_weight=self.distill.feature_weight,
            feature_kind=self.distill.feature_loss, teacher_forced=self.distill.teacher_forced,
            return_student_output=True, force_drop_ids=drop,
        )  # fmt: skip
        task = self.objective.losses(output, images, noised)
        terms.update({name: value for name, value in task.items() if name != "loss"})
        terms["loss"] = self.distill.task_weight * task["loss"] + terms["loss_kd_output"] + terms["loss_kd_feature"]
        return terms

    # ----------------------------------------------------------------------------------- reports
    def describe(self, network: DiT) -> dict:
        """Size of a network: blocks, parameters (total and activated per image) and forward FLOPs per image."""
        return {"blocks": network.depth, "parameters": parameter_count(network),
                "activated_parameters": activated_parameter_count(network), "flops_per_image": flops_per_image(network)}

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dicomp"] = {"keep": self.keep, "teacher": asdict(self.teacher_config)}

    def recorded_student(self, checkpoint: dict) -> DiTConfig:
        """The student architecture a checkpoint records (a subclass may record more than the DiT config)."""
        return DiTConfig.from_dict(checkpoint["ditlab"]["dit_config"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Rebuild the student at the checkpoint's architecture (a later progressive stage may be shallower)."""
        meta = checkpoint.get("ditlab", {})
        if "dit_config" not in meta or "dicomp" not in checkpoint:
            raise ValueError("this checkpoint was not written by DicompModule; resume it with the module that wrote it")
        super().on_load_checkpoint(checkpoint)
        self.objective_config = run_settings(meta)[0]
        self.keep = list(checkpoint["dicomp"]["keep"])
        config = self.recorded_student(checkpoint)
        if self.network is not None and self.network.config == config:
            return  # same architecture: the strategy loads the weights into the (possibly sharded) student
        if is_sharded(self):
            raise ValueError("this checkpoint's student has another architecture (a later progressive stage) and "
                             "cannot be loaded into a sharded student; resume it with strategy ddp or on one device")  # fmt: skip
        student = config.build().to(self.device)
        self.attach(student, copy.deepcopy(student) if self.ema_decay is not None else None)
        self.reconfigure()
