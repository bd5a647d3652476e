"""``Dense2MoEModule``: turn a trained dense DiT into a mixture of experts, then a Mixture of Blocks, by distillation.

Dense2MoE (arXiv 2510.09094) keeps the teacher's capacity and cuts what each image *activates*:

1. carve every FFN into shared and routed experts by Taylor neuron importance, and initialise the routers
   (:mod:`ditlab.methods.compress.carve`; ``carve.mode: upcycle`` copies the FFN into every expert instead);
2. distil: diffusion loss on data + output KD + per-block feature KD from the frozen dense teacher, plus the
   experts' balance loss (added by the training step from the MoE layers, logged as ``train/loss_balance``);
3. Mixture of Blocks (:mod:`ditlab.methods.moe.blocks`): at a ``ProgressiveDistillation`` stage the student
   becomes groups of ``mixture.group_size`` blocks of which ``blocks / groups`` run per image (``blocks`` is
   the callback's active depth), routers started from the blocks' LAPTOP importance; the feature loss then
   applies at group boundaries (the paper's group feature loss).

The teacher, calibration images, progressive stages, checkpoints, resume and the compression report are
DicompModule's; this module changes how the student is built, what a stage does and which features are matched.

Text-to-image teachers (the paper restructures FLUX.1): on an MM-DiT (``mmdit``, ``flux`` double blocks) both
streams' FFNs are carved (:func:`~ditlab.methods.compress.carve.block_ffns`), calibrated on the teacher's own
loss with the calibration images' captions (encoded by the teacher's text encoder); the block features matched
are the whole ``[text; image]`` sequence the blocks carry ([interp]: the text stream's FFNs are carved too, so
its features are distilled with the image's), and the Mixture-of-Blocks routers read the condition's adaLN vector
(:mod:`ditlab.methods.moe.blocks`). PixArt blocks have one FFN, carved as DiT's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.distributed import gathered, is_sharded
from ditlab.methods.compress.analysis import CRITERIA, select_blocks
from ditlab.methods.compress.carve import CarveConfig, block_ffns, calibrate_ffns, carve_network, check_dense
from ditlab.methods.compress.distill import FEATURE_LOSSES, feature_loss, shared_drop_ids
from ditlab.methods.compress.module import DicompModule, DistillConfig, PruneConfig
from ditlab.methods.moe.blocks import MixtureOfBlocks, mixture_of_blocks
from ditlab.methods.teacher import TeacherConfig
from ditlab.models.budget import activated_parameter_count, flops_per_image, parameter_count
from ditlab.models.dit import DiT
from ditlab.models.taps import run_blocks
from ditlab.models.text.prompts import condition_input


@dataclass
class BlockMixtureConfig:
    """The Mixture-of-Blocks stage (entered by a ``ProgressiveDistillation`` stage; its ``blocks`` is the depth each
    image runs, a multiple of the number of groups).

    Args:
        group_size: consecutive blocks per group G (must divide the depth).
        criterion: block importance that starts each group's router (see ``ditlab.methods.compress.analysis``).
    """

    group_size: int = 4
    criterion: str = "laptop"


def ffn_activated_parameters(network: DiT) -> int:
    """Feed-forward parameters an image activates: every block's FFNs (their shared and top-K experts; an MM-DiT
    block's image and text FFNs), only the blocks an image runs under a Mixture of Blocks."""
    return network.trunk.per_image([sum(activated_parameter_count(getattr(block, name)) for name in block_ffns(block))
                                    for block in network.blocks])  # fmt: skip


def describe_network(network: DiT) -> dict:
    """Blocks an image runs, total and activated parameters (all and FFN) and forward FLOPs per image."""
    return {"blocks": network.trunk.per_image([1] * network.depth),
            "parameters": parameter_count(network), "activated_parameters": activated_parameter_count(network),
            "ffn_activated_parameters": ffn_activated_parameters(network),
            "flops_per_image": flops_per_image(network)}  # fmt: skip


class Dense2MoEModule(DicompModule):
    """Carves a dense teacher's FFNs into experts and distils; see the config dataclasses for every option.

    Args:
        teacher: the dense teacher (a checkpoint, or a recipe trained once and cached).
        carve: experts, top-K, shared width, importance, assignment, router init and gates.
        mixture: the Mixture-of-Blocks stage.
        distill: loss weights (task, output KD, feature KD) and the feature loss.
        objective, sampling, options: as in ``DicompModule``.
    """

    def __init__(
        self,
        teacher: TeacherConfig = TeacherConfig(),
        carve: CarveConfig = CarveConfig(),
        mixture: BlockMixtureConfig = BlockMixtureConfig(),
        distill: DistillConfig = DistillConfig(),
        objective: ObjectiveConfig = ObjectiveConfig(),
        sampling: SamplingConfig | None = None,
        **options,
    ) -> None:
        if carve.top_k > carve.num_experts:
            raise ValueError(f"model.carve.top_k={carve.top_k} exceeds model.carve.num_experts={carve.num_experts}; "
                             "choose top_k <= num_experts")  # fmt: skip
        if mixture.criterion not in CRITERIA:
            raise ValueError(f"model.mixture.criterion={mixture.criterion!r}; choices: {list(CRITERIA)}")
        if distill.teacher_forced:
            raise ValueError("model.distill.teacher_forced is not supported by Dense2MoEModule (its student keeps every "
                             "teacher block); set it to false")  # fmt: skip
        if distill.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"model.distill.feature_loss={distill.feature_loss!r}; choices: {list(FEATURE_LOSSES)}")
        prune = PruneConfig(criterion=mixture.criterion, calibration_images=carve.calibration_images, seed=carve.seed)
        super().__init__(teacher=teacher, prune=prune, distill=distill, objective=objective, sampling=sampling,
                         **options)  # fmt: skip
        self.carve, self.mixture = carve, mixture

    # ----------------------------------------------------------------------------------- building
    def build_student(self, images: torch.Tensor, labels) -> None:
        """Calibrate on the teacher, carve its FFNs into experts and start training the carved network.

        ``labels``: the calibration images' class labels, or for a text-conditioned teacher their captions (encoded
        here by its text encoder) or ``TextFeatures``."""
        teacher = self.teacher
        check_dense(teacher, f"the teacher {self.teacher_config.checkpoint or self.teacher_config.recipe}")
        self.carve.moe_options(teacher.config.mlp_width)  # bad carving options fail here, before calibration
        labels = condition_input(teacher.config, labels, self.device)
        self.calibration = (images, labels)
        objective = self.objective_config.build(teacher.learn_sigma)
        calibration = None
        if self.carve.mode == "split":
            calibration = calibrate_ffns(teacher, objective, images.to(self.device), labels.to(self.device),
                                         max_tokens=self.carve.max_tokens, seed=self.carve.seed)  # fmt: skip
        generator = torch.Generator(device=self.device).manual_seed(self.carve.seed)
        student = carve_network(teacher, self.carve, calibration, generator)
        self.keep = list(range(teacher.depth))
        self.attach(student.train())
        self.summary["carving"] = {"mlp_options": student.config.mlp_options, "teacher": describe_network(teacher),
                                   "student": describe_network(student)}  # fmt: skip

    def shrink(self, num_blocks: int, criterion: str | None = None, init: str | None = None) -> list[int]:
        """A progressive stage: run ``num_blocks`` blocks per image as a Mixture of Blocks (``init`` is unused).

        Returns the blocks each group's router starts with (every process must agree on them)."""
        network, ema = self.network, self.ema
        if is_sharded(self):
            network, ema = gathered(network), gathered(ema) if ema is not None else None
        size, depth = self.mixture.group_size, network.depth
        if size < 1 or depth % size:
            raise ValueError(f"model.mixture.group_size={size} does not divide the student's {depth} blocks")
        groups = depth // size
        if num_blocks % groups or not groups <= num_blocks <= depth:
            raise ValueError(f"progressive blocks={num_blocks}: a Mixture of Blocks runs k of each of its {groups} "
                             f"groups, so use a multiple of {groups} between {groups} and {depth}")  # fmt: skip
        active = num_blocks // groups
        if isinstance(network.trunk, MixtureOfBlocks):  # a later stage: fewer blocks per group, same routers
            student = mixture_of_blocks(network, size, active)
            new_ema = mixture_of_blocks(ema, size, active) if ema is not None else None
            scores = None
        else:
            images, labels = self.calibration
            scores = select_blocks(network, self.objective, images.to(self.device), labels.to(self.device),
                                   criterion or self.mixture.criterion, num_blocks, seed=self.prune.seed,
                                   num_timesteps=self.prune.num_timesteps).scores  # fmt: skip
            student = mixture_of_blocks(network, size, active, scores)
            new_ema = mixture_of_blocks(ema, size, active, scores) if ema is not None else None
        bias = student.trunk.router.bias.detach().float().cpu()  # whole, before the student is sharded again
        starts = bias.topk(active, dim=1).indices + torch.arange(groups)[:, None] * size
        self.attach(student.to(self.device).train(), new_ema.to(self.device) if new_ema is not None else None)
        self.reconfigure()
        if scores is not None:
            self.summary["mixture_of_blocks"] = {"group_size": size, "active": active,
                                                 "block_scores": [round(float(s), 6) for s in scores]}  # fmt: skip
        return sorted(starts.flatten().tolist())

    # ----------------------------------------------------------------------------------- training
    def matched_layers(self) -> list[int]:
        """Blocks whose output is matched to the teacher's: every block, or each group's last under MoB."""
        trunk = self.network.trunk
        if isinstance(trunk, MixtureOfBlocks):
            return [group[-1] for group in trunk.groups(self.network.depth)]
        return list(range(self.network.depth))

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        noised, drop = self.training_draws(images, labels)
        student, layers = self.network, self.matched_layers()
        drop = shared_drop_ids(student, labels, drop)
        weights = self.distill
        with torch.no_grad():
            target = run_blocks(self.teacher, noised.xt, noised.model_t, labels, hidden=layers, force_drop_ids=drop)
        tapped = run_blocks(student, noised.xt, noised.model_t, labels, hidden=layers, force_drop_ids=drop)
        features = torch.stack([feature_loss(tapped.hidden[i], target.hidden[i], weights.feature_loss) for i in layers])
        terms = {"loss_kd_output": weights.output_weight * (tapped.output - target.output).square().mean(),
                 "loss_kd_feature": weights.feature_weight * features.mean()}  # fmt: skip
        task = self.objective.losses(tapped.output, images, noised)
        terms.update({name: value for name, value in task.items() if name != "loss"})
        terms["loss"] = weights.task_weight * task["loss"] + terms["loss_kd_output"] + terms["loss_kd_feature"]
        return terms

    # ----------------------------------------------------------------------------------- reports
    def describe(self, network: DiT) -> dict:
        return describe_network(network)
