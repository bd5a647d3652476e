"""``GraftModule``: put new attention operators (or parallel block pairs) into a trained DiT, then fine-tune.

Stage 1 (at build time, :mod:`ditlab.methods.graft.stage1`) regresses every new operator onto the frozen
teacher's cached activations; stage 2 (training) fine-tunes end to end with the diffusion loss plus CLEAR's
distillation terms from the frozen full-attention teacher (Liu et al., NeurIPS 2025, distill.py):

    loss = task * ||v_S - u||^2 + output * ||out_S - out_T||^2 + attention * mean_l ||o_S^l - o_T^l||^2

where ``o^l`` is block ``l``'s attention output (pre-gate) in each network's own forward. CLEAR trains only the
attention layers (``trainable: attention``); Grafting fine-tunes the grafted network (``trainable: all``).
The result is an ordinary checkpoint: its config names the operator (``attention: local``) or the block kind
(``block: parallel-pair``), so sample, eval and analyze load it like any DiT.

Text-to-image teachers train on captioned batches (the calibration images' captions are encoded by the teacher's
text encoder). On PixArt every operator grafts into the blocks' self-attention (Grafting's text-to-image case
study grafts PixArt-Sigma's); on an MM-DiT the operator is ``clear`` (CLEAR on FLUX: local attention among image
tokens, text tokens attended globally), stage 1 regresses the joint attention onto the teacher's, and the
attention distillation compares the joint attention's ``[text; image]`` outputs on the blocks CLEAR converts (all
of them by default: ``graft.blocks: all``, ``distill.attention_blocks: grafted``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ditlab.checkpoint import run_settings
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.base import DiffusionModule
from ditlab.methods.graft.build import graft_operator, parallel_pairs
from ditlab.methods.graft.plan import select_blocks
from ditlab.methods.graft.stage1 import (
    Stage1Config,
    cache_operator_io,
    cache_pair_io,
    noised_inputs,
    regress_operators,
    regress_pairs,
)
from ditlab.methods.teacher import FromTeacher, TeacherConfig
from ditlab.models.budget import activated_parameter_count, flops_per_image, parameter_count
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT
from ditlab.models.operators.cost import attention_operator_flops
from ditlab.models.text.features import TextFeatures
from ditlab.models.text.prompts import condition_input

TRAINABLE = ("all", "attention", "grafted")


@dataclass
class GraftConfig:
    """What is grafted.

    Args:
        operator: the new attention kind (``local``, ``window``, ``hyena``, ``block-sparse``, ``hierarchical``,
            or ``full`` for a self-graft, the fine-tuned-teacher baseline).
        options: the operator's ``attention_options`` (radius, window, variant, ...).
        blocks: the grafted blocks: all | odd | even (1-based, as the papers count) | a fraction | a list.
        parallel: also turn each pair of sequential blocks into one parallel block (depth halves).
    """

    operator: str = "local"
    options: dict[str, Any] = field(default_factory=dict)
    blocks: Any = "all"
    parallel: bool = False


@dataclass
class GraftDistillConfig:
    """Stage-2 loss weights and what trains.

    Args:
        task_weight: the diffusion loss on data.
        output_weight: ``||out_S - out_T||^2`` against the frozen teacher (CLEAR: 0.5).
        attention_weight: attention-output distillation (CLEAR: 0.5); sequential students only.
        attention_blocks: blocks whose attention outputs are distilled: grafted | all | a list of indices.
        trainable: all | attention (every attention layer: CLEAR) | grafted (only the grafted blocks' attention).
    """

    task_weight: float = 1.0
    output_weight: float = 0.5
    attention_weight: float = 0.5
    attention_blocks: Any = "grafted"
    trainable: Literal["all", "attention", "grafted"] = "all"


def attention_outputs(network: DiT, blocks: list[int], call) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``call()``'s output and the attention outputs ``(B, N, D)`` of ``blocks`` seen during it."""
    seen: dict[int, torch.Tensor] = {}
    handles = [network.blocks[i].attn.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0]))
               for i in blocks]  # fmt: skip
    try:
        output = call()
    finally:
        for handle in handles:
            handle.remove()
    return output, seen


class GraftModule(FromTeacher, DiffusionModule):
    """Grafts new operators into a teacher DiT (stage 1) and fine-tunes the result (stage 2).

    Args:
        teacher: where the teacher comes from (a checkpoint, or a recipe trained once and cached).
        graft: the operator, its options, the grafted blocks and the parallel-pair restructuring.
        stage1: the per-block activation regression.
        distill: stage-2 loss weights and the trainable set.
        objective: used only for teachers that do not record one.
        sampling: sampling settings; None takes the teacher's.
        options: every other ``DiffusionModule`` option (lr, warmup, EMA, ...).
    """

    builds_own_network = True

    def __init__(self, teacher: TeacherConfig = TeacherConfig(), graft: GraftConfig = GraftConfig(),
                 stage1: Stage1Config = Stage1Config(), distill: GraftDistillConfig = GraftDistillConfig(),
                 objective: ObjectiveConfig = ObjectiveConfig(), sampling: SamplingConfig | None = None,
                 **options) -> None:  # fmt: skip
        if distill.trainable not in TRAINABLE:
            raise ValueError(f"model.distill.trainable={distill.trainable!r}; choices: {list(TRAINABLE)}")
        super().__init__(objective=objective, sampling=sampling or SamplingConfig(), **options)
        self.teacher_config, self.graft, self.stage1, self.distill = teacher, graft, stage1, distill
        self.hold_teacher(sampling is not None)
        self.grafted: list[int] = []

    # ----------------------------------------------------------------------------------- the teacher
    # ----------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.network is None:
            datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
            self.build_student(*self.calibration_batch(datamodule))
        super().configure_model()

    def calibration_batch(self, datamodule) -> tuple[torch.Tensor, torch.Tensor]:
        """``stage1.calibration_images`` training images and labels (digits when there is no datamodule)."""
        wanted = self.stage1.calibration_images
        if datamodule is None:
            from ditlab.data.digits import digits_tensors

            images, labels = digits_tensors(self.teacher.input_size)
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.stage1.seed))[:wanted]
            return images[order], labels[order]
        datamodule.setup("fit")
        loader = torch.utils.data.DataLoader(datamodule.train_dataloader().dataset, batch_size=256, shuffle=True,
                                             generator=torch.Generator().manual_seed(self.stage1.seed))  # fmt: skip
        text = self.teacher.config.text_conditioned
        batches, count = [], 0
        for batch in loader:
            # a captioned batch is (images, labels, captions): a text-conditioned teacher reads the captions
            batches.append((batch[0], batch[2] if text and len(batch) > 2 else batch[1]))
            count += len(batch[0])
            if count >= wanted:
                break
        images = torch.cat([b[0] for b in batches])[:wanted]
        if isinstance(batches[0][1], torch.Tensor):
            return images, torch.cat([b[1] for b in batches])[:wanted]
        if isinstance(batches[0][1], TextFeatures):
            return images, TextFeatures.cat([b[1] for b in batches])[:wanted]
        return images, [caption for b in batches for caption in b[1]][:wanted]

    def build_student(self, images: torch.Tensor, labels) -> None:
        """Graft (and pair) the teacher, run stage 1 on ``images``, and start training the student; ``labels`` are
        class labels, or for a text-conditioned teacher captions (encoded by its text encoder) or ``TextFeatures``."""
        teacher = self.teacher
        labels = condition_input(teacher.config, labels, self.device)
        self.grafted = select_blocks(self.graft.blocks, teacher.depth) if self.graft.operator != "full" else []
        student = graft_operator(teacher, self.graft.operator, self.graft.options, self.grafted)
        objective = self.objective_config.build(teacher.learn_sigma)
        x, t, y = noised_inputs(objective, images.to(self.device), labels.to(self.device),
                                self.stage1.timesteps_per_image, self.stage1.seed)  # fmt: skip
        report: dict = {}
        if self.graft.parallel:
            student = parallel_pairs(student)
            if self.stage1.steps:
                report = regress_pairs(student, cache_pair_io(teacher, x, t, y), self.stage1)
        elif self.grafted and self.stage1.steps:
            report = regress_operators(student, cache_operator_io(teacher, x, t, y, self.grafted), self.stage1)
        self.attach(student.train())
        self.set_trainable()
        self.summary["graft"] = {"operator": self.graft.operator, "blocks": self.grafted, "parallel": self.graft.parallel,
                                 "stage1": {str(k): v for k, v in report.items()},
                                 "teacher": self.describe(teacher), "student": self.describe(student)}  # fmt: skip

    def set_trainable(self) -> None:
        """Freeze what the ``distill.trainable`` set leaves out (CLEAR: only attention layers train)."""
        mode = self.distill.trainable
        for name, parameter in self.network.named_parameters():
            if mode == "all":
                parameter.requires_grad_(name != "pos_embed")
            else:
                block = int(name.split(".")[1]) if name.startswith("blocks.") else None
                in_scope = ".attn." in name and (mode == "attention" or block in self.grafted)
                parameter.requires_grad_(in_scope)

    def describe(self, network: DiT) -> dict:
        """Size and cost: blocks, parameters, forward FLOPs per image and the attention operators' share of them
        (an MM-DiT's joint attention over its ``condition_options.text_length`` text tokens and its image tokens)."""
        tokens = network.x_embedder.num_patches
        if network.text_stream:
            tokens += int(network.config.condition_options.get("text_length", 0))
        return {"blocks": network.depth, "parameters": parameter_count(network),
                "activated_parameters": activated_parameter_count(network), "flops_per_image": flops_per_image(network),
                "attention_flops_per_image": attention_operator_flops(network, tokens)}  # fmt: skip

    # ----------------------------------------------------------------------------------- stage 2
    def distilled_blocks(self) -> list[int]:
        if self.graft.parallel or not self.distill.attention_weight:
            return []
        spec = self.distill.attention_blocks
        if spec == "grafted":
            return list(self.grafted)
        return select_blocks(spec, self.network.depth)

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        noised, drop = self.training_draws(images, labels)
        blocks = self.distilled_blocks()

        def run(network: DiT):
            return attention_outputs(network, blocks, lambda: network(noised.xt, noised.model_t, labels,
                                                                      force_drop_ids=drop))  # fmt: skip

        output, student_attention = run(self.network)
        with torch.no_grad():
            target, teacher_attention = run(self.teacher)
        task = self.objective.losses(output, images, noised)
        terms = {name: value for name, value in task.items() if name != "loss"}
        terms["loss_task"] = task["loss"]
        terms["loss_kd_output"] = F.mse_loss(output, target)
        terms["loss_kd_attention"] = (torch.stack([F.mse_loss(student_attention[i], teacher_attention[i])
                                                   for i in blocks]).mean() if blocks else output.new_zeros(()))  # fmt: skip
        terms["loss"] = (self.distill.task_weight * task["loss"] + self.distill.output_weight * terms["loss_kd_output"]
                         + self.distill.attention_weight * terms["loss_kd_attention"])  # fmt: skip
        return terms

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["graft"] = {"blocks": self.grafted, "teacher": asdict(self.teacher_config)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Rebuild the student at the checkpoint's architecture (no stage 1: the weights come from the file)."""
        meta = checkpoint.get("ditlab", {})
        if "dit_config" not in meta or "graft" not in checkpoint:
            raise ValueError("this checkpoint was not written by GraftModule; resume it with the module that wrote it")
        super().on_load_checkpoint(checkpoint)
        self.objective_config = run_settings(meta)[0]
        self.grafted = list(checkpoint["graft"]["blocks"])
        config = DiTConfig.from_dict(meta["dit_config"])
        if self.network is not None and self.network.config == config:
            return
        student = config.build().to(self.device)
        self.attach(student, copy.deepcopy(student) if self.ema_decay is not None else None)
        self.set_trainable()
        self.reconfigure()
