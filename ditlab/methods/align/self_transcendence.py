"""``SelfTranscendenceModule``: representation alignment with no external encoder.

Self-Transcendence (Sun et al., csslc/Self-Transcendence, arXiv 2601.07773), as specified from its released
code in ``shared/methods/training.md`` section 5:

- **phase 1** trains a SiT with an extra head on a shallow block (MLP -> LayerNorm -> linear -> unpatchify)
  that regresses the clean-latent quantity (the velocity ``eps - x0`` in the code, ``x0`` in the paper's
  words), only for ``t`` in [0.4, 0.7]: ``L = L_FM + 0.5 m(t) |head - v|^2``;
- **phase 2** freezes the phase-1 network as a teacher, runs it with the class label and with the null
  label on the student's own ``(x_t, t)``, extrapolates its block-``k_T`` tokens like CFG
  (``f_g = f_u + w (f_c - f_u)``) and aligns a *fresh* student's shallow block ``k_S`` (through an MLP) to
  ``f_g`` with the same time mask, until a stop step (``AlignmentTermination``).

[interp] choices, where the spec leaves room:
- the teacher receives the true labels (the student's own are dropped for CFG inside its embedder);
- ``target=x0`` converts the head's velocity to ``x0_hat`` through the interpolant instead of a separate
  x0 head, so both targets share one head and differ only by the ``t``-weight (linear path: ``t^2``);
- the phase-1 head's MLP and the phase-2 projector are REPA's three-layer SiLU MLP (as the released code builds
  them); the projector needs the teacher's width to equal the student's (the paper trains the same SiT twice);
- with no phase-1 checkpoint given, phase 1 is this same config run with ``--model.init_args.phase 1`` for
  ``teacher.steps`` steps, trained once and cached by a hash of the recipe (``methods/teacher.py``);
- text-conditioned networks (PixArt, MM-DiT): the guidance's null condition is the empty caption (the caption
  drop-out's), the teacher reads the batch's captions, and the clean head and the aligned features are the
  image tokens (an MM-DiT's ``[text; image]`` cut to its image part, :mod:`ditlab.methods.align.streams`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from jsonargparse import lazy_instance

from ditlab.checkpoint import network_from_checkpoint, read_checkpoint
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.align.base import AlignmentBase
from ditlab.methods.align.config import CleanAlignConfig, GuidedAlignConfig, PhaseOneTeacherConfig
from ditlab.methods.align.losses import (
    CleanHead,
    guided,
    masked_error,
    masked_negative_cosine,
    mlp,
    time_mask,
    velocity_to_x0,
)
from ditlab.methods.align.streams import image_tokens
from ditlab.methods.teacher import TeacherConfig, build_from_recipe, teacher_path
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT
from ditlab.models.taps import run_blocks
from ditlab.models.text.features import TextFeatures


class SelfTranscendenceModule(AlignmentBase):
    """Phase 1 (clean-latent head) or phase 2 (self-guided feature alignment) of Self-Transcendence.

    Args:
        phase: 1 trains the teacher with the shallow clean head; 2 trains a fresh student against it.
        network, objective, sampling: as in ``DiffusionModule``; the objective must be ``flow`` (the method is
            defined on SiT); network defaults to DiT-XL/2.
        clean: the phase-1 head and its loss.
        guided: the phase-2 teacher block, student block, feature guidance scale and loss.
        teacher: where the phase-1 network comes from (phase 2).
        options: every other ``DiffusionModule`` option (lr, warmup, EMA, VAE, compile, checkpointing, ...).

    Loss terms: ``loss_diffusion``, ``loss_align_clean`` (phase 1) or ``loss_align_guided`` (phase 2),
    ``loss_align`` (weighted) and ``loss``.
    """

    method = "self-transcendence"

    def __init__(
        self,
        phase: Literal[1, 2] = 2,
        network: DiTConfig = lazy_instance(DiTConfig),
        objective: ObjectiveConfig = ObjectiveConfig(kind="flow"),
        sampling: SamplingConfig = SamplingConfig(),
        clean: CleanAlignConfig = CleanAlignConfig(),
        guided: GuidedAlignConfig = GuidedAlignConfig(),
        teacher: PhaseOneTeacherConfig = PhaseOneTeacherConfig(),
        **options,
    ) -> None:
        if phase not in (1, 2):
            raise ValueError(
                f"model.init_args.phase={phase!r} must be 1 (teacher with the clean head) or 2 (student)"
            )
        if objective.kind != "flow":
            raise ValueError("Self-Transcendence is defined on SiT's interpolant objective; set "
                             "model.init_args.objective.kind=flow")  # fmt: skip
        network = DiTConfig.plain(network)
        super().__init__(network=network, objective=objective, sampling=sampling, **options)
        self.phase, self.clean, self.guided, self.teacher_config = phase, clean, guided, teacher
        depth, width = self.network.depth, network.hidden_size
        if phase == 1:
            if not 1 <= clean.block <= depth:
                raise ValueError(f"model.init_args.clean.block={clean.block} is out of range 1..{depth}")
            self.heads["clean"] = CleanHead(width, clean.hidden, network.patch_size, network.in_channels,
                                            clean.layers)  # fmt: skip
        else:
            if not 1 <= guided.block <= depth:
                raise ValueError(f"model.init_args.guided.block={guided.block} is out of range 1..{depth}")
            if network.text_conditioned and network.condition_options.get("dropout_prob", 0.1) <= 0:
                raise ValueError("phase 2 guides features with the empty caption; the teacher (and this network) need "
                                 "model.init_args.network.condition_options.dropout_prob > 0")  # fmt: skip
            if not network.text_conditioned and network.class_dropout_prob <= 0:
                raise ValueError("phase 2 guides features with the null label; the teacher (and this network) need "
                                 "model.init_args.network.class_dropout_prob > 0")  # fmt: skip
            self.heads["guided"] = mlp(width, guided.hidden, width, layers=guided.layers)
        self.summary["alignment"].update(phase=phase)

    @property
    def uses_target(self) -> bool:
        return self.phase == 2

    @property
    def terminable(self) -> bool:
        """Only phase 2's guidance loss has a stop step (the code's ``stop_epoch``); phase 1's head trains throughout."""
        return self.phase == 2

    # ----------------------------------------------------------------------------------- phase-1 teacher
    def recipe(self) -> TeacherConfig:
        """This recipe's phase 1, as the shared teacher builder sees it."""
        config = self.teacher_config
        args = ["--model.init_args.phase", "1", "--trainer.max_steps", str(config.steps), *config.recipe_args]
        return TeacherConfig(recipe=config.recipe, recipe_args=args, cache_dir=config.cache_dir)

    def prepare_data(self) -> None:
        """Phase 2 without a phase-1 checkpoint: train this recipe's phase 1 once (cached), on one process per node."""
        if self.uses_target and self.alignment_active and not self.teacher_config.checkpoint:
            build_from_recipe(self.recipe())

    def teacher_path(self) -> Path:
        """The phase-1 checkpoint: the configured one, or this recipe's cached phase 1 (built in prepare_data)."""
        config = self.teacher_config
        if config.checkpoint:
            path = Path(config.checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"phase-1 checkpoint {path} does not exist; set model.init_args.teacher."
                                        "checkpoint to a .ckpt written by phase 1, or null to train it once")  # fmt: skip
            return path
        return teacher_path(self.recipe())

    def load_target(self) -> DiT:
        path = self.teacher_path()
        checkpoint = read_checkpoint(path)
        align = checkpoint.get("align") or {}
        if align.get("method") != self.method or align.get("phase") != 1:
            written = (f"Self-Transcendence phase {align.get('phase')}" if align.get("method") == self.method
                       else f"{align['method']!r} alignment" if align.get("method") else "a plain diffusion run")
            raise ValueError(f"phase-2 teacher {path} was written by {written}, not Self-Transcendence phase 1; set "
                             "model.init_args.teacher.checkpoint to a phase-1 .ckpt, or null to train phase 1 once")  # fmt: skip
        teacher = network_from_checkpoint(checkpoint, use_ema=self.teacher_config.weights == "ema")
        student, block = self.network, self.guided.teacher_block
        if (teacher.input_size, teacher.patch_size, teacher.in_channels) != (
            student.input_size, student.patch_size, student.in_channels
        ):  # fmt: skip
            raise ValueError(f"phase-1 teacher {path} sees {teacher.input_size}px inputs with patch {teacher.patch_size} "
                             f"and {teacher.in_channels} channels; the student must match it")  # fmt: skip
        if teacher.x_embedder.proj.out_channels != self.network_config.hidden_size:
            raise ValueError(f"phase-1 teacher {path} has width {teacher.x_embedder.proj.out_channels}, the student "
                             f"{self.network_config.hidden_size}; train both at the same width")  # fmt: skip
        if not 1 <= block <= teacher.depth:
            raise ValueError(f"model.init_args.guided.teacher_block={block} is out of range for the phase-1 "
                             f"teacher of depth {teacher.depth}")  # fmt: skip
        if teacher.text_conditioned != self.network_config.text_conditioned:
            raise ValueError(f"phase-1 teacher {path} is conditioned on {teacher.config.condition!r}, the student on "
                             f"{self.network_config.condition!r}; train both with the same condition")  # fmt: skip
        if not teacher.text_conditioned and teacher.y_embedder.embedding_table.num_embeddings <= teacher.num_classes:
            raise ValueError(f"phase-1 teacher {path} has no null class (trained with class_dropout_prob=0)")
        self.summary["alignment"].update(teacher=str(path), teacher_weights=self.teacher_config.weights,
                                         teacher_phase=1)  # fmt: skip
        return teacher

    @property
    def teacher(self) -> DiT | None:
        """The frozen phase-1 network (phase 2; loaded on first use); None after termination or in phase 1."""
        return self.target_network

    # ----------------------------------------------------------------------------------- losses
    def alignment_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        noised, drop = self.training_draws(images, labels)
        block = (self.clean.block if self.phase == 1 else self.guided.block) - 1
        tapped = run_blocks(self.network, noised.xt, noised.model_t, labels, hidden=[block], force_drop_ids=drop)
        terms = self.objective.losses(tapped.output, images, noised)
        if self.phase == 1:
            name, weight = "loss_align_clean", self.clean.weight
            terms[name] = self.clean_loss(tapped.hidden[block], images, noised)
        else:
            name, weight = "loss_align_guided", self.guided.weight
            target = self.guided_features(noised.xt, noised.model_t, labels)
            predicted = self.heads["guided"](image_tokens(self.network, tapped.hidden[block]))
            mask = time_mask(noised.t, self.guided.t_range)
            loss = masked_error if self.guided.loss == "mse" else masked_negative_cosine
            terms[name] = loss(predicted, target, mask)
        terms["loss_align"] = weight * terms[name]
        terms["loss"] = terms["loss"] + terms["loss_align"]
        return terms

    def clean_loss(self, tokens: torch.Tensor, images: torch.Tensor, noised) -> torch.Tensor:
        """Phase 1: masked error of the head's velocity (or the ``x0_hat`` it implies) on block tokens ``(B, N, D)``."""
        velocity = self.network.unpatchify(self.heads["clean"](image_tokens(self.network, tokens)))
        mask = time_mask(noised.t, self.clean.t_range)
        if self.clean.target == "velocity":
            return masked_error(velocity, self.objective.target(images, noised), mask)
        return masked_error(velocity_to_x0(self.objective, noised.xt, velocity, noised.t), images, mask)

    @torch.no_grad()
    def guided_features(self, xt: torch.Tensor, model_t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The teacher's CFG-extrapolated block-``k_T`` tokens ``(B, N, D)``, one batched cond + null pass."""
        teacher = self.teacher
        if isinstance(labels, TextFeatures):
            both_labels = TextFeatures.cat([labels, labels.null_rows()])  # the empty caption
        else:
            both_labels = torch.cat([labels, torch.full_like(labels, teacher.num_classes)])
        both = run_blocks(teacher, torch.cat([xt, xt]), torch.cat([model_t, model_t]), both_labels,
                          stop_after=self.guided.teacher_block - 1).output  # fmt: skip
        conditional, unconditional = image_tokens(teacher, both).chunk(2)
        return guided(conditional, unconditional, self.guided.guidance)

    # ----------------------------------------------------------------------------------- checkpoints
    def alignment_state(self) -> dict:
        return {**super().alignment_state(), "phase": self.phase}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        phase = checkpoint.get("align", {}).get("phase")
        if phase is not None and phase != self.phase:
            raise ValueError(f"this checkpoint is from Self-Transcendence phase {phase} but the config trains phase "
                             f"{self.phase}; use it as model.init_args.teacher.checkpoint instead of resuming it")  # fmt: skip
        super().on_load_checkpoint(checkpoint)
