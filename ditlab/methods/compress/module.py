"""``DicompModule``: compress a trained DiT into a shallower (and optionally narrower) student, then distil.

The recipe follows the depth-pruning papers: choose the blocks to keep with an importance criterion
(PPCL's contiguous-interval probes, arXiv 2511.16156; LAPTOP-Diff's one-shot output loss, arXiv 2404.11098;
Amber-Image's timestep sensitivity, arXiv 2602.17047; TinyFusion's learned layer mask, arXiv 2412.01199; or a
baseline), build the student from the teacher's weights (copy, Amber-style local averaging over the segment a
block stands for, or re-initialisation; optional width pruning of heads and MLP channels), and train it in
phases: each phase sets the loss weights (diffusion loss on data, output KD on the prediction channels,
block-feature KD against the end of each student block's segment), teacher forcing and what is trainable.
PPCL's recipe is a local phase (teacher-forced direction loss on the replacement blocks, the rest frozen)
then a global one; its replacements are plugs (:meth:`DicompModule.plugged`). ``ProgressiveDistillation``
shrinks the student further in stages.

The teacher is never saved in checkpoints; a checkpoint records the student's architecture and which
teacher blocks it stands for, so a resumed run (even past a progressive stage) rebuilds the same student.

Text-to-image teachers (PixArt, SD3 MM-DiT, FLUX blocks; ``configs/dicomp_t2i.yaml``) compress the same way, as
Amber-Image and PPCL compress the dual-stream MM-DiT of Qwen-Image: calibration images come with their captions,
encoded by the teacher's frozen text encoder; a FLUX teacher's double- and single-stream blocks are ranked by their
own criteria and budgets (``prune.single_criterion``, ``prune.num_double``; [interp] a share in proportion by
default), while PPCL's intervals may span both stream types; width pruning covers the new blocks' head and MLP
families (``ditlab.methods.compress.prune``); caption drop-out is shared by student and teacher in distillation.
What cannot apply is refused in one line (e.g. a cross-attention head count other than the self-attention's).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ditlab.checkpoint import read_checkpoint, run_settings
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.distributed import gathered, is_sharded
from ditlab.methods.base import DiffusionModule
from ditlab.methods.compress.analysis import WHOLE_STACK, Selection, select_blocks, stream_groups
from ditlab.methods.compress.distill import FEATURE_LOSSES, distillation_losses
from ditlab.methods.compress.ppcl import plugged, replaced_blocks
from ditlab.methods.compress.prune import check_width_prunable, prune_depth, prune_width, taylor_scores
from ditlab.methods.compress.prune import segments as keep_segments
from ditlab.methods.teacher import FromTeacher, TeacherConfig
from ditlab.models.budget import activated_parameter_count, flops_per_image, parameter_count
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT
from ditlab.models.loading import read_sharded_checkpoint
from ditlab.models.text.features import TextFeatures
from ditlab.models.text.prompts import encode_prompts


@dataclass
class PruneConfig:
    """How the student is cut from the teacher.

    Args:
        criterion: block importance: laptop | amber | ppcl | tinyfusion | random | first | last.
        num_blocks: student depth after the initial cut (progressive stages may cut further). Width-only
            pruning keeps the teacher's depth.
        init: kept-block weights: copy (the kept block; PPCL's middle block of its interval), average (Amber
            local averaging over the segment it stands for) or random (re-initialised, an ablation).
        calibration_images: training images used to score blocks (and heads / channels).
        num_timesteps: noise levels the criteria average (or, for amber, bin) over.
        seed: calibration noise and the random baseline.
        options: the criterion's own options (``ditlab.methods.compress.analysis.OPTIONS``), e.g. PPCL's
            ``order`` / ``max_span``, LAPTOP's ``additivity_sets``, TinyFusion's ``group_size`` / ``steps``.
        num_heads: attention heads kept per block (width pruning); None keeps all.
        mlp_hidden: MLP channels kept per block; None keeps all.
        width_score: magnitude or taylor (``|w * dL/dw|`` summed per head / channel, on the calibration images).
        num_double: a FLUX teacher's double-stream blocks kept by the initial cut (the rest of ``num_blocks`` are
            single-stream); None shares ``num_blocks`` in proportion. Other networks refuse it.
        single_criterion: the criterion of a FLUX teacher's single-stream blocks (``criterion`` ranks its
            double-stream blocks); None uses ``criterion`` for both.
        cross_heads: PixArt cross-attention heads kept (width); must equal ``num_heads`` (one config count).
        text_mlp_hidden: MM-DiT text-stream MLP channels kept (width); must equal ``mlp_hidden`` (one config count).
    """

    criterion: Literal["laptop", "amber", "ppcl", "tinyfusion", "random", "first", "last"] = "laptop"
    num_blocks: int = 6
    init: Literal["copy", "average", "random"] = "copy"
    calibration_images: int = 256
    num_timesteps: int = 8
    seed: int = 0
    options: dict = field(default_factory=dict)
    num_heads: int | None = None
    mlp_hidden: int | None = None
    width_score: Literal["magnitude", "taylor"] = "magnitude"
    num_double: int | None = None
    single_criterion: Literal["laptop", "amber", "random", "first", "last"] | None = None
    cross_heads: int | None = None
    text_mlp_hidden: int | None = None


@dataclass
class DistillConfig:
    """Loss weights: ``loss = task * L_diffusion + output * ||out_S - out_T||^2 + feature * L_feature``.

    Args:
        task_weight: the ordinary diffusion loss on data (0 for pure distillation).
        output_weight: output distillation.
        output_channels: prediction (LAPTOP-Diff: the noise / velocity channels, not a learned variance) or all.
        feature_weight: block-feature distillation between each student block and the teacher block ending
            its segment.
        feature_loss: mse | normalized_mse (LAPTOP-Diff) | direction (PPCL) | cosine | normalized_l1 |
            direction_magnitude (PPCL's direction loss with its optional magnitude term).
        teacher_forced: feed each student block the teacher's input to its segment (PPCL's local phase).
        trainable: all (the whole student), blocks (its blocks; Amber's layer-wise stage) or replaced (only
            blocks standing for more than one teacher block: PPCL's replacements, the rest frozen).
        layers: all student blocks get a feature term, or only the replaced ones.
    """

    task_weight: float = 1.0
    output_weight: float = 1.0
    output_channels: Literal["prediction", "all"] = "prediction"
    feature_weight: float = 1.0
    feature_loss: str = "normalized_mse"
    teacher_forced: bool = False
    trainable: Literal["all", "blocks", "replaced"] = "all"
    layers: Literal["all", "replaced"] = "all"


@dataclass
class PhaseConfig(DistillConfig):
    """A training phase that runs ``steps`` optimiser steps with its own losses and trainable set (then the
    next phase, and after the last listed phase ``model.distill`` for the rest of the run)."""

    steps: int = 0


class DicompModule(FromTeacher, DiffusionModule):
    """Prunes a teacher DiT into a student and distils it; see the config dataclasses for every option.

    Args:
        teacher: where the teacher comes from (a checkpoint, or a recipe trained once and cached).
        prune: block selection, student depth, re-initialisation and width pruning.
        distill: loss weights, feature loss and trainable set (after the ``phases``, to the end of the run).
        phases: earlier training phases, each for its ``steps`` (PPCL's local phase: teacher-forced direction
            loss on the replacement blocks only; Amber's layer-wise phase), before ``distill`` takes over.
        objective: used only for teachers that do not record one (public DiT / diffusers files).
        sampling: sampling settings for grids and metrics; None takes the teacher's.
        options: every other ``DiffusionModule`` option (lr, warmup, EMA, compile, checkpointing, ...).
    """

    def __init__(
        self,
        teacher: TeacherConfig = TeacherConfig(),
        prune: PruneConfig = PruneConfig(),
        distill: DistillConfig = DistillConfig(),
        phases: list[PhaseConfig] | None = None,
        objective: ObjectiveConfig = ObjectiveConfig(),
        sampling: SamplingConfig | None = None,
        **options,
    ) -> None:
        phases = list(phases or [])
        for name, config in [("distill", distill), *((f"phases[{i}]", phase) for i, phase in enumerate(phases))]:
            if config.feature_loss not in FEATURE_LOSSES:
                raise ValueError(f"model.{name}.feature_loss={config.feature_loss!r}; choices: {list(FEATURE_LOSSES)}")
        if any(phase.steps < 1 for phase in phases):
            raise ValueError(f"model.phases steps {[phase.steps for phase in phases]} must each be at least 1")
        if prune.num_blocks < 1:
            raise ValueError(f"model.prune.num_blocks={prune.num_blocks} must be at least 1")
        super().__init__(objective=objective, sampling=sampling or SamplingConfig(), **options)
        self.teacher_config, self.prune, self.distill, self.phases = teacher, prune, distill, phases
        self.hold_teacher(sampling is not None)
        self.keep: list[int] = []
        """Teacher block behind each student block (the block it was copied from)."""
        self.segments: list[tuple[int, int]] = []
        """``(first, last)`` teacher blocks each student block stands for (its distillation target)."""
        self.calibration: tuple[torch.Tensor, torch.Tensor] | None = None
        self._phase_applied: int | None = None

    # ----------------------------------------------------------------------------------- building
    builds_own_network = True

    def configure_model(self) -> None:
        """Build the student once the trainer (and its datamodule, for calibration images) is attached."""
        if self.network is None:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            images, labels = self.calibration_batch(datamodule)
            self.build_student(images, labels)
        super().configure_model()

    def calibration_batch(self, datamodule) -> tuple[torch.Tensor, object]:
        """``prune.calibration_images`` training images and their condition: labels, or for a text-conditioned
        teacher its captions encoded by the teacher's text encoder (``TextFeatures``). Without a datamodule: the
        digits, or the digit scenes and their captions for a text-conditioned teacher."""
        wanted = self.prune.calibration_images
        text = self.teacher.config.text_conditioned
        if datamodule is None:
            if text:
                return self.scene_calibration(wanted)
            from ditlab.data.digits import digits_tensors

            images, labels = digits_tensors(self.teacher.input_size)
            return images[:wanted], labels[:wanted]
        datamodule.setup("fit")
        generator = torch.Generator().manual_seed(self.prune.seed)
        batches, count = [], 0
        train = datamodule.train_dataloader()
        loader = torch.utils.data.DataLoader(train.dataset, batch_size=256, shuffle=True, generator=generator,
                                             collate_fn=train.collate_fn)  # fmt: skip
        for batch in loader:
            if text and len(batch) < 3 and not isinstance(batch[1], (list, tuple)):
                raise ValueError("a text-conditioned teacher is calibrated on captioned images: set "
                                 "data.init_args.captions true (digit scenes) or give a datamodule with captions")  # fmt: skip
            batches.append((batch[0], batch[2] if text and len(batch) > 2 else batch[1]))
            count += len(batch[0])
            if count >= wanted:
                break
        images = torch.cat([b[0] for b in batches])[:wanted]
        if text and isinstance(batches[0][1], TextFeatures):  # pre-encoded caption features (ditlab encode)
            return images, TextFeatures.cat([b[1] for b in batches])[:wanted]
        if text:
            captions = [caption for b in batches for caption in b[1]][:wanted]
            return images, encode_prompts(self.teacher.config, captions)
        return images, torch.cat([b[1] for b in batches])[:wanted]

    def scene_calibration(self, count: int) -> tuple[torch.Tensor, object]:
        """``count`` seeded digit scenes ``(B, 3, S, S)`` and their captions encoded by the teacher's text encoder."""
        from ditlab.data.scenes import DigitScenes

        teacher = self.teacher
        if teacher.in_channels != 3:
            raise ValueError(f"a text-conditioned teacher without a datamodule is calibrated on the digit scenes (RGB),"
                             f" but it takes {teacher.in_channels} channels; give a datamodule with its data")  # fmt: skip
        scenes = DigitScenes("train")
        order = torch.randperm(len(scenes), generator=torch.Generator().manual_seed(self.prune.seed))[:count].tolist()
        images = torch.nn.functional.interpolate(scenes.images(order), size=teacher.input_size, mode="bilinear",
                                                 antialias=True, align_corners=False)  # fmt: skip
        return images, encode_prompts(teacher.config, scenes.captions(order))

    def select(self, network: DiT, criterion: str, num_blocks: int, num_double: int | None = None) -> Selection:
        """Run ``criterion`` on ``network`` with the calibration images (the options apply to ``prune.criterion``).

        On a FLUX network the double- and single-stream blocks are pruned by their own criteria (``criterion`` and
        ``prune.single_criterion``) and budgets (``num_double`` double-stream blocks, else a share in proportion),
        except by PPCL and TinyFusion, which choose over the whole stack (``analysis.select_blocks``)."""
        images, labels = self.calibration
        options = dict(self.prune.options) if criterion == self.prune.criterion else {}
        objective = self.objective_config.build(network.learn_sigma)
        groups = stream_groups(network)
        budget: int | list[int] = num_blocks
        criteria: str | list[str] = criterion
        if len(groups) > 1 and criterion not in WHOLE_STACK:
            criteria = [criterion, self.prune.single_criterion or criterion]
            if num_double is not None:
                if not 0 <= num_double <= min(num_blocks, len(groups[0])) or num_blocks - num_double > len(groups[1]):
                    raise ValueError(f"model.prune.num_double={num_double} does not fit {num_blocks} blocks from "
                                     f"{len(groups[0])} double- and {len(groups[1])} single-stream blocks")  # fmt: skip
                budget = [num_double, num_blocks - num_double]
        elif num_double is not None:
            why = (f"{criterion} chooses over the whole stack" if len(groups) > 1
                   else "this network has one stream type (it is not a FLUX network)")  # fmt: skip
            raise ValueError(f"model.prune.num_double={num_double} cannot apply: {why}; leave it null")
        return select_blocks(network, objective, images.to(self.device), labels.to(self.device), criteria, budget,
                             seed=self.prune.seed, num_timesteps=self.prune.num_timesteps, **options)  # fmt: skip

    def build_student(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Select blocks on the teacher, cut the student from it (depth, then width) and start training it."""
        teacher = self.teacher
        if self.prune.num_blocks > teacher.depth:
            raise ValueError(f"model.prune.num_blocks={self.prune.num_blocks} exceeds the teacher's depth "
                             f"{teacher.depth}; choose at most {teacher.depth}")  # fmt: skip
        self.calibration = (images, labels)
        selection = self.select(teacher, self.prune.criterion, self.prune.num_blocks, self.prune.num_double)
        student = prune_depth(teacher, selection.keep, init=self.prune.init, spans=selection.segments)
        width = (self.prune.num_heads, self.prune.mlp_hidden, self.prune.cross_heads, self.prune.text_mlp_hidden)
        if any(value is not None for value in width):
            check_width_prunable(student)
            grads = self.taylor_gradients(student) if self.prune.width_score == "taylor" else None
            student = prune_width(student, num_heads=self.prune.num_heads, mlp_hidden=self.prune.mlp_hidden,
                                  score=self.prune.width_score, grads=grads, cross_heads=self.prune.cross_heads,
                                  text_mlp_hidden=self.prune.text_mlp_hidden)  # fmt: skip
        self.keep, self.segments = list(selection.keep), [tuple(s) for s in selection.segments]
        self.attach(student.train())
        self.summary["selection"] = {"criterion": selection.criterion, "keep": self.keep,
                                     "segments": [list(s) for s in self.segments],
                                     "scores": [round(float(s), 6) for s in selection.scores]}  # fmt: skip
        for key in ("intervals", "fallback", "used_solver", "additivity"):
            if key in selection.table:
                self.summary["selection"][key] = selection.table[key]
        if "stream_groups" in selection.table:  # FLUX: what each stream type kept, by which criterion
            self.summary["selection"]["stream_groups"] = [
                {key: group[key] for key in ("kind", "blocks", "criterion", "num_keep", "keep")}
                for group in selection.table["stream_groups"]]  # fmt: skip

    def taylor_gradients(self, network: DiT, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """``dL/dw`` of the diffusion loss on the calibration images (seeded noise) for Taylor width scores."""
        images, labels = (tensor.to(self.device) for tensor in self.calibration)
        objective = self.objective_config.build(network.learn_sigma)
        generator = torch.Generator(device=self.device).manual_seed(self.prune.seed)
        batches = [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, len(images), batch_size)]

        def loss(dit: DiT, batch) -> torch.Tensor:
            x0, y = batch
            noised = objective.prepare(x0, generator=generator)
            drop = torch.zeros(len(y), dtype=torch.long, device=x0.device)
            return objective.losses(dit(noised.xt, noised.model_t, y, drop), x0, noised)["loss"]

        with torch.enable_grad():
            return taylor_scores(network, loss, batches)

    def shrink(self, num_blocks: int, criterion: str | None = None, init: str | None = None) -> list[int]:
        """Cut the current student to ``num_blocks`` (a progressive stage); returns the student blocks kept.

        Every process must call it (a sharded student is gathered first); the caller rebuilds the optimiser and,
        under DDP, the wrapper (``ditlab.callbacks.progressive``).
        """
        if not 1 <= num_blocks <= self.network.depth:
            raise ValueError(f"cannot shrink a {self.network.depth}-block student to {num_blocks} blocks")
        network, ema = self.network, self.ema
        if is_sharded(self):  # cut whole copies (every process), then shard the new student below
            network, ema = gathered(network), gathered(ema) if ema is not None else None
        selection = self.select(network, criterion or self.prune.criterion, num_blocks)
        init = init or self.prune.init
        student = prune_depth(network, selection.keep, init=init, spans=selection.segments).train()
        ema = prune_depth(ema, selection.keep, init=init, spans=selection.segments) if ema is not None else None
        # a kept student block now stands for the teacher blocks of every student block in its new segment
        self.segments = [(self.segments[first][0], self.segments[last][1]) for first, last in selection.segments]
        self.keep = [self.keep[i] for i in selection.keep]
        self.attach(student, ema)
        self.reconfigure()  # checkpointing, compile and sharding for the new blocks
        self._phase_applied = None
        return list(selection.keep)

    def plugged(self, mask: list[bool] | None = None) -> DiT:
        """The sampled student with each PPCL plug (``ditlab.methods.compress.ppcl.plugs``) on or off; all off
        gives back the teacher when only the replacement blocks were trained."""
        return plugged(self.teacher, self.sampling_network, self.segments, mask)

    # ----------------------------------------------------------------------------------- training
    def phase(self, step: int | None = None) -> tuple[int, DistillConfig]:
        """``(index, phase)`` at optimiser step ``step`` (default: the current one); index ``len(phases)`` is
        ``distill``."""
        step = self.global_step if step is None else step
        for index, phase in enumerate(self.phases):
            if step < phase.steps:
                return index, phase
            step -= phase.steps
        return len(self.phases), self.distill

    def stage_starts(self) -> list[tuple[int, str]]:
        """``(step, phase)`` where each phase after the first starts (``model.distill`` after the listed ones)."""
        starts, step = [], 0
        for index, phase in enumerate(self.phases):
            if index:
                starts.append((step, f"phase model.phases[{index}]"))
            step += phase.steps
        return [*starts, (step, "phase model.distill")] if self.phases else starts

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every student parameter any phase trains (the frozen position embedding aside): phases freeze by
        ``requires_grad``, and AdamW skips parameters without a gradient, so one optimiser serves all phases."""
        return [p for name, p in self.network.named_parameters() if name != "pos_embed"]

    def apply_phase(self, phase: DistillConfig) -> None:
        """Freeze what ``phase`` does not train (``trainable``)."""
        if phase.trainable == "replaced":
            replaced = replaced_blocks(self.segments)
            if not replaced:
                raise ValueError("trainable=replaced, but no student block stands for more than one teacher block "
                                 "(use criterion ppcl, or trainable all / blocks)")  # fmt: skip
            prefixes = tuple(f"blocks.{index}." for index in replaced)
        else:
            prefixes = ("",) if phase.trainable == "all" else ("blocks.",)
        for name, parameter in self.network.named_parameters():
            if name != "pos_embed":
                parameter.requires_grad_(name.startswith(prefixes))

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        index, phase = self.phase()
        if index != self._phase_applied:
            self.apply_phase(phase)
            self._phase_applied = index
        noised, drop = self.training_draws(images, labels)
        with_task = phase.task_weight != 0
        channels = images.shape[1] if phase.output_channels == "prediction" else None
        layers = replaced_blocks(self.segments) if phase.layers == "replaced" else None
        result = distillation_losses(
            self.network, self.teacher, noised.xt, noised.model_t, labels, self.keep,
            output_weight=phase.output_weight, feature_weight=phase.feature_weight, feature_kind=phase.feature_loss,
            teacher_forced=phase.teacher_forced, layers=layers, return_student_output=with_task,
            force_drop_ids=drop, spans=self.segments, output_channels=channels,
        )  # fmt: skip
        terms, output = result if with_task else (result, None)
        terms["loss"] = terms["loss_kd_output"] + terms["loss_kd_feature"]
        if with_task:
            task = self.objective.losses(output, images, noised)
            terms.update({name: value for name, value in task.items() if name != "loss"})
            terms["loss"] = terms["loss"] + phase.task_weight * task["loss"]
        terms["phase"] = images.new_tensor(float(index))
        return terms

    # ----------------------------------------------------------------------------------- reports
    def describe(self, network: DiT) -> dict:
        """Size of a network: blocks, parameters (total and activated per image) and forward FLOPs per image."""
        return {"blocks": network.depth, "parameters": parameter_count(network),
                "activated_parameters": activated_parameter_count(network), "flops_per_image": flops_per_image(network)}

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dicomp"] = {"keep": self.keep, "segments": [list(s) for s in self.segments],
                                "teacher": asdict(self.teacher_config)}  # fmt: skip

    def recorded_student(self, checkpoint: dict) -> DiTConfig:
        """The student architecture a checkpoint records (a subclass may record more than the DiT config)."""
        return DiTConfig.from_dict(checkpoint["ditlab"]["dit_config"])

    def prepare_checkpoint_load(self, path: str | Path) -> None:
        """Before a sharded resume loads its shards (``FSDP2Strategy.load_checkpoint``, every process): rebuild,
        re-shard and re-optimise the student at the architecture the checkpoint records, when it differs (a
        later progressive stage is shallower than the student the run starts with)."""
        path = Path(path)
        checkpoint = read_sharded_checkpoint(path, tensors=False) if path.is_dir() else read_checkpoint(path)
        if "dicomp" not in checkpoint or "dit_config" not in checkpoint.get("ditlab", {}):
            return  # on_load_checkpoint says what is wrong with it
        config = self.recorded_student(checkpoint)
        if self.network is None or self.network.config == config:
            return
        student = config.build().to(self.device)
        self.attach(student, copy.deepcopy(student) if self.ema_decay is not None else None)
        self.reconfigure()
        self.trainer.strategy.setup_optimizers(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Rebuild the student at the checkpoint's architecture (a later progressive stage may be shallower)."""
        meta = checkpoint.get("ditlab", {})
        if "dit_config" not in meta or "dicomp" not in checkpoint:
            raise ValueError("this checkpoint was not written by DicompModule; resume it with the module that wrote it")
        super().on_load_checkpoint(checkpoint)
        self.objective_config = run_settings(meta)[0]
        self.keep = list(checkpoint["dicomp"]["keep"])
        recorded = checkpoint["dicomp"].get("segments")
        self.segments = [tuple(s) for s in recorded] if recorded else keep_segments(self.teacher.depth, self.keep)
        self._phase_applied = None
        config = self.recorded_student(checkpoint)
        if self.network is not None and self.network.config == config:
            return  # same architecture: the strategy loads the weights into the (possibly sharded) student
        if is_sharded(self):
            raise ValueError("this checkpoint's student has another architecture (a later progressive stage) and "
                             "cannot be loaded into a sharded student by this strategy; resume it with "
                             "ditlab.distributed.FSDP2Strategy, ddp or one device")  # fmt: skip
        student = config.build().to(self.device)
        self.attach(student, copy.deepcopy(student) if self.ema_decay is not None else None)
        self.reconfigure()
