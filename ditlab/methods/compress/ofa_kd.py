"""OFA-KD: distillation between heterogeneous architectures through exit heads in the prediction space.

Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation" (NeurIPS
2023), public code github Hao840/OFAKD (``distillers/ofa.py``). A student of another architecture than its teacher
(a ConvNet under a ViT) has intermediate features that match none of the teacher's, so OFA-KD compares neither: it
puts an *exit branch* after each of the student's stages that projects the stage's features into the logit space,
and distils every branch (and the student's own output) against the teacher's final logits, with

    L_OFA = - sum_c ((p_t^c + 1[c = y])^eps - 1[c = y]) log p_s^c

whose exponent ``eps >= 1`` is the *adaptive target enhancement*: it moves the target distribution towards the
ground-truth class, more so where the teacher is confident in it (``eps = 1`` is plain KD).

For diffusion ([interp], the adaptation is ours; the paper is classification):

- the aligned space is the *prediction space*: the teacher's output over the prediction channels (epsilon or
  velocity, not a learned variance). An exit head maps the student's tokens after a stage ``(B, n, W)`` (any width,
  any resolution: an hourglass stage at level ``l`` has ``N / 4^l`` tokens) to a full-size prediction ``(B, C, H,
  W)``: ``head_blocks`` blocks of the student's own kind built for that stage (the paper's branches are blocks of the
  student's architecture), then DiT's adaLN-modulated LayerNorm and a linear map to a ``(p s)^2 C`` patch per token
  (``s`` the stage's down-sampling), un-patchified;
- the distance is the squared error (the Gaussian log-likelihood a diffusion prediction is trained with) to an
  *enhanced target* ``y^ = y_T + lambda (y* - y_T)`` between the teacher's prediction ``y_T`` and the diffusion
  target ``y*`` (the ground truth, as the label is in classification). The teacher's "probability of the target
  class" is its per-sample agreement with the ground truth, ``p = exp(-||y_T - y*||^2 / (T ||y*||^2))`` (``T``: the
  ``temperature``), and ``lambda`` is the share of the gap to the ground truth that OFA's exponent closes in the
  two-outcome case (target class vs the rest, ``p`` vs ``1 - p``): the enhanced target mass is
  ``m = ((1+p)^eps - 1) / ((1+p)^eps - 1 + (1-p)^eps)`` and ``lambda = (m - p) / (1 - p)``, which simplifies to
  ``((1+p)^eps - 1 - p (1-p)^(eps-1)) / ((1+p)^eps - 1 + (1-p)^eps)``. So ``eps = 1`` gives ``lambda = 0`` (plain
  KD in the prediction space: zero loss for a student whose heads reproduce the teacher), ``lambda`` grows with
  ``eps`` and with the teacher's confidence (0 at ``p = 0``, 1 at ``p = 1`` for ``eps > 1``), exactly as the
  exponent enhances a confident teacher's target class most. ``lambda`` and ``y^`` carry no gradient.
- the loss is ``loss_kd_ofa = weight * sum over stages of mean (head_s - y^)^2`` (summed over stages, as the code)
  and ``loss_kd_output = output_weight * mean (out_S - y^)^2`` on the student's own prediction (the paper's OFA loss
  on the final logits); with ``weight: 0, eps: 1`` this is plain output KD, the baseline OFA-KD is compared with.

Text-to-image networks (``condition: text``: ``pixart``, ``mmdit`` blocks): student and teacher read the same encoded
captions, so the student names the teacher's text encoder and widths (refused in one line otherwise); an exit head's
blocks take the :class:`~ditlab.models.condition.TextCondition`, its modulation reads the condition's vector, and on a
network whose blocks carry ``[text; image]`` (MM-DiT) it predicts from the image tokens, the last ``N``.

The student needs hidden taps (``trunk.hidden_taps``: the plain block loop and the ``dico`` hourglass have them). By
default the stages are the ends of the trunk's stages but the last (``trunk.stage_ends()``: the dico hourglass's
encoder, middle and decoder stages) or, for an isotropic stack, the ends of its first three quarters (the paper's
four-stage split, the fourth being the output).

:class:`OFADistillModule` trains a freshly built student of any block/trunk kind (``student:``, e.g. DiCo) against a
frozen teacher (``teacher:``, e.g. the digits DiT) with the diffusion loss plus these terms; its exit heads train
with it and are not part of the sampled network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jsonargparse import lazy_instance
from torch import nn

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.base import DiffusionModule
from ditlab.methods.compress.distill import prediction_kd, shared_drop_ids
from ditlab.methods.teacher import FromTeacher, TeacherConfig
from ditlab.models.budget import flops_per_image, parameter_count
from ditlab.models.components import build_component
from ditlab.models.condition import TextCondition, condition_vector
from ditlab.models.config import DiTConfig
from ditlab.models.dit import DiT, modulate
from ditlab.models.text.features import TextFeatures


@dataclass
class OFAConfig:
    """OFA-KD's terms (``loss = task * L_diffusion + output * L_out + weight * sum_s L_s``).

    Args:
        weight: the exit heads' term (OFA's ``ofa_loss_weight``); 0 drops the heads (plain output KD).
        output_weight: the student output's term against the same enhanced target (OFA's ``kd_loss_weight``).
        task_weight: the ordinary diffusion loss on data (OFA's ``gt_loss_weight``).
        eps: the target-enhancement exponent, at least 1 (1: plain KD in the prediction space).
        temperature: scale of the teacher's agreement ``p = exp(-relative error / temperature)``.
        stages: student blocks whose output gets an exit head; None: the trunk's stage ends but the last, or the
            first three quarter-points of an isotropic stack.
        head_blocks: blocks of the student's kind in each exit head before its projection (0: projection only).
    """

    weight: float = 1.0
    output_weight: float = 1.0
    task_weight: float = 1.0
    eps: float = 1.5
    temperature: float = 1.0
    stages: list[int] | None = None
    head_blocks: int = 1

    def __post_init__(self) -> None:
        if not self.eps >= 1.0:
            raise ValueError(f"model.ofa.eps={self.eps} must be at least 1 (1 = plain KD; OFA-KD enhances with eps > 1)")
        if not self.temperature > 0:
            raise ValueError(f"model.ofa.temperature={self.temperature} must be positive")
        if self.head_blocks < 0:
            raise ValueError(f"model.ofa.head_blocks={self.head_blocks} must be 0 or more")


# ----------------------------------------------------------------------------------- the OFA target and loss
def teacher_agreement(teacher: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per sample ``p = exp(-||y_T - y*||^2 / (T ||y*||^2))`` in ``(0, 1]``: the teacher's "probability of the
    target class" ([interp], see the module docstring)."""
    error = (teacher - target).flatten(1).square().sum(1)
    scale = target.flatten(1).square().sum(1).clamp_min(torch.finfo(target.dtype).tiny)
    return torch.exp(-error / (temperature * scale))


def enhancement(agreement: torch.Tensor, eps: float) -> torch.Tensor:
    """``lambda(p)``: the share of the gap from the teacher to the ground truth that OFA's exponent ``eps`` closes in
    the two-outcome case (0 for ``eps = 1``; see the module docstring)."""
    if eps < 1:
        raise ValueError(f"eps={eps} must be at least 1")
    p = agreement
    if eps == 1:
        return torch.zeros_like(p)
    lifted = torch.expm1(eps * torch.log1p(p))  # (1 + p)^eps - 1, exact for a teacher far from the truth (p ~ 0)
    return ((lifted - p * (1 - p) ** (eps - 1)) / (lifted + (1 - p) ** eps)).clamp(0.0, 1.0)


@torch.no_grad()
def enhanced_target(teacher: torch.Tensor, target: torch.Tensor, eps: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """``y^ = y_T + lambda(p) (y* - y_T)`` per sample, ``(B, C, H, W)``; the teacher's prediction itself at ``eps = 1``."""
    if eps == 1:
        return teacher
    weight = enhancement(teacher_agreement(teacher, target, temperature), eps)
    return teacher + weight.view(-1, *([1] * (teacher.ndim - 1))) * (target - teacher)


# ----------------------------------------------------------------------------------- exit heads
def unpatchify(patches: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """``(B, n, patch^2 C)`` on a square grid -> ``(B, C, side patch, side patch)`` (DiT's patch order)."""
    side = math.isqrt(patches.shape[1])
    grid = patches.reshape(patches.shape[0], side, side, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", grid).reshape(patches.shape[0], channels, side * patch, side * patch)


class ExitHead(nn.Module):
    """Student tokens after a stage ``(B, n, W)`` -> a prediction ``(B, C, H, W)``: ``blocks`` blocks of the student's
    kind built for that stage, then an adaLN-modulated LayerNorm and a linear map to full-resolution patches.
    ``num_tokens`` counts image tokens; with ``text_stream`` the tokens are ``[text; image]`` (an MM-DiT's) and the
    head predicts from the last ``num_tokens``."""

    def __init__(self, config: DiTConfig, stage: int, width: int, num_tokens: int, channels: int, blocks: int = 1,
                 text_stream: bool = False) -> None:  # fmt: skip
        super().__init__()
        scale = math.isqrt(config.num_tokens // num_tokens) if 0 < num_tokens <= config.num_tokens else 0
        if scale * scale * num_tokens != config.num_tokens:
            raise ValueError(f"stage {stage} has {num_tokens} tokens, not the network's {config.num_tokens} over a "
                             "square factor; OFA-KD exit heads need a square token grid at every stage")  # fmt: skip
        self.stage, self.patch, self.channels = stage, config.patch_size * scale, channels
        self.num_tokens, self.text_stream = num_tokens, text_stream
        self.blocks = nn.ModuleList(build_component("block", config, stage) for _ in range(blocks))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, 2 * width))
        self.linear = nn.Linear(width, self.patch**2 * channels)
        for block in self.blocks:  # adaLN-Zero: each branch block starts as the identity, as in the network
            if callable(getattr(block, "initialize", None)):
                block.initialize()
            modulation = getattr(block, "adaLN_modulation", None)
            if modulation is not None:
                nn.init.zeros_(modulation[-1].weight)
                nn.init.zeros_(modulation[-1].bias)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor | TextCondition) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens, cond)
        if self.text_stream:
            tokens = tokens[:, -self.num_tokens :]
        shift, scale = self.adaLN_modulation(condition_vector(cond)).chunk(2, dim=1)
        return unpatchify(self.linear(modulate(self.norm(tokens), shift, scale)), self.patch, self.channels)


def default_stages(student: DiT) -> list[int]:
    """Exit-head stages: the trunk's stage ends but the last (an hourglass), else the ends of the first three
    quarters of the blocks (OFA-KD's four stages, the last being the output)."""
    ends = getattr(student.trunk, "stage_ends", None)
    if callable(ends):
        return list(ends()[:-1])
    depth = student.depth
    return sorted({max(0, round(depth * quarter / 4) - 1) for quarter in (1, 2, 3)} - {depth - 1})


def probe_condition(config: DiTConfig, device: torch.device) -> torch.Tensor | TextFeatures:
    """One row of the condition ``config``'s network reads, for a shape probe: class label 0, or (text-conditioned)
    all-zero text features of the configured widths, one real token per ``text_length``, their own empty caption."""
    if not config.text_conditioned:
        return torch.zeros(1, dtype=torch.long, device=device)
    options = config.condition_options
    length = max(1, int(options.get("text_length") or 1))
    tokens = torch.zeros(1, length, options["text_dim"], device=device)
    pooled = torch.zeros(1, int(options.get("pooled_dim") or 0), device=device)
    mask = torch.ones(1, length, dtype=torch.bool, device=device)
    return TextFeatures(tokens, pooled, mask, TextFeatures(tokens, pooled, mask))


def check_conditions(student: DiTConfig, teacher: DiTConfig) -> None:
    """Refuse, in one line, a student that cannot read the teacher's condition input (labels or encoded captions)."""

    def condition(config: DiTConfig) -> dict | None:
        if not config.text_conditioned:
            return None
        options = config.condition_options
        return {"encoder": options.get("encoder"), "encoder_options": dict(options.get("encoder_options") or {}),
                "text_dim": options.get("text_dim"), "pooled_dim": int(options.get("pooled_dim") or 0)}  # fmt: skip

    def reads(config: DiTConfig) -> str:
        read = condition(config)
        if read is None:
            return "class labels"
        return "captions through " + ", ".join(f"{key}={value!r}" for key, value in read.items())

    if condition(student) != condition(teacher):
        raise ValueError(f"model.student reads {reads(student)} but the teacher reads {reads(teacher)}; OFA-KD feeds both "
                         "the same condition: give the student the teacher's condition (for text: the same "
                         "condition_options encoder, encoder_options, text_dim and pooled_dim)")  # fmt: skip


def tapped_forward(student: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, stages: Sequence[int],
                   force_drop_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:  # fmt: skip
    """The student's output, its tokens after each of ``stages`` and its condition, in one pass through its trunk
    (any trunk with hidden taps; its tokens may change width and resolution between stages)."""
    if not student.trunk.hidden_taps:
        raise ValueError(f"OFA-KD reads the student's tokens after its stages, which the {student.config.trunk!r} "
                         "trunk does not record; use a student whose trunk has hidden taps (blocks, dico)")  # fmt: skip
    tokens, cond = student.embed(x, t, y, force_drop_ids)
    hidden: dict[int, torch.Tensor] = {}
    t = t.expand(len(tokens)) if t.ndim == 0 else t
    tokens = student.trunk(student, tokens, cond, t, hidden=hidden)
    return student.head(tokens, cond), {stage: hidden[stage] for stage in stages}, cond


class OFAHeads(nn.Module):
    """One :class:`ExitHead` per student stage, keyed by the stage's block index."""

    def __init__(self, heads: dict[int, ExitHead]) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({str(stage): head for stage, head in sorted(heads.items())})

    @property
    def stages(self) -> list[int]:
        return [int(stage) for stage in self.heads]

    @classmethod
    def build(cls, student: DiT, stages: Sequence[int] | None = None, head_blocks: int = 1,
              channels: int | None = None) -> OFAHeads:  # fmt: skip
        """Heads for ``student`` at ``stages`` (default :func:`default_stages`), predicting ``channels`` (default the
        student's input channels: the prediction, not a learned variance); one probe forward reads each stage's
        width and token count."""
        stages = default_stages(student) if stages is None else sorted(set(stages))
        outside = [stage for stage in stages if not 0 <= stage < student.depth]
        if outside:
            raise ValueError(f"model.ofa.stages has {outside} outside 0..{student.depth - 1} for the student")
        if not stages:
            raise ValueError("OFA-KD needs at least one student stage for an exit head (model.ofa.stages)")
        config = student.config
        device = next(student.parameters()).device
        probe = torch.zeros(1, config.in_channels, config.input_size, config.input_size, device=device)
        label = probe_condition(config, device)
        drop = torch.zeros(1, dtype=torch.long, device=device) if config.text_conditioned else None
        with torch.no_grad():
            _, hidden, _ = tapped_forward(student, probe, torch.zeros(1, device=device), label, stages, drop)
        channels = channels or config.in_channels
        text = len(label.tokens[0]) if student.text_stream else 0  # an MM-DiT's tokens are [text; image]
        heads = {stage: ExitHead(config, stage, hidden[stage].shape[-1], hidden[stage].shape[1] - text, channels,
                                 head_blocks, text_stream=student.text_stream) for stage in stages}  # fmt: skip
        return cls(heads).to(device)

    def forward(self, hidden: dict[int, torch.Tensor], cond: torch.Tensor) -> dict[int, torch.Tensor]:
        return {int(stage): head(hidden[int(stage)], cond) for stage, head in self.heads.items()}


def ofa_losses(
    student: DiT,
    teacher: DiT,
    heads: OFAHeads | None,
    xt: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: float = 1.0,
    output_weight: float = 1.0,
    eps: float = 1.0,
    temperature: float = 1.0,
    force_drop_ids: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``loss_kd_ofa`` (exit heads) and ``loss_kd_output`` (the student's prediction) against the enhanced target,
    and the student's full output ``(B, C_out, H, W)`` (for the task loss, no second pass).

    ``xt: (B, C, H, W)``, ``t: (B,)``, ``y: (B,)``; ``target: (B, C, H, W)`` is the diffusion target (``y*``). Teacher
    and student see the same label drop-out (:func:`~ditlab.methods.compress.distill.shared_drop_ids`); the
    teacher runs without gradients. ``heads`` None or ``weight`` 0: no exit heads (plain output KD at ``eps = 1``).
    """
    if (student.input_size, student.in_channels) != (teacher.input_size, teacher.in_channels):
        raise ValueError(f"student ({student.in_channels}x{student.input_size}^2) and teacher "
                         f"({teacher.in_channels}x{teacher.input_size}^2) see different inputs; OFA-KD needs the same")  # fmt: skip
    check_conditions(student.config, teacher.config)
    channels = target.shape[1]
    drop = shared_drop_ids(student, y, force_drop_ids)
    with torch.no_grad():
        goal = enhanced_target(teacher(xt, t, y, drop)[:, :channels], target, eps, temperature)
    use_heads = heads is not None and weight != 0
    stages = heads.stages if use_heads else []
    output, hidden, cond = tapped_forward(student, xt, t, y, stages, drop)
    zero = xt.new_zeros(())
    terms = {"loss_kd_output": output_weight * prediction_kd(output, goal, channels) if output_weight else zero,
             "loss_kd_ofa": zero}  # fmt: skip
    if use_heads:
        exits = heads(hidden, cond)
        terms["loss_kd_ofa"] = weight * sum(prediction_kd(exits[stage], goal, channels) for stage in stages)
    return terms, output


# ----------------------------------------------------------------------------------- training
class OFADistillModule(FromTeacher, DiffusionModule):
    """Trains a student of any architecture (``student``: e.g. ``block: dico, trunk: dico``) from scratch against a
    frozen teacher with OFA-KD (see the module docstring); ``ofa: {weight: 0, eps: 1}`` is plain output KD.

    Args:
        teacher: where the teacher comes from (a checkpoint, or a recipe trained once and cached).
        student: the student's architecture (its input size and channels must be the teacher's).
        ofa: loss weights, target enhancement, stages and exit-head depth.
        objective: used only for teachers that do not record one (the run adopts the teacher's).
        sampling: sampling settings for grids and metrics; None takes the teacher's.
        options: every other ``DiffusionModule`` option (lr, warmup, EMA, ...).

    In a config (the digits DiT teacher, configs/dico.yaml's network as the student)::

        model:
          class_path: ditlab.methods.compress.ofa_kd.OFADistillModule
          init_args:
            teacher: {recipe: configs/dit.yaml}
            student: {preset: digits, input_size: 16, patch_size: 2, hidden_size: 64, depth: 16, mlp_ratio: 2.0,
                      block: dico, trunk: dico, trunk_options: {stages: [4, 3, 2, 3, 4]}, positions: none}
            ofa: {weight: 1.0, output_weight: 1.0, task_weight: 1.0, eps: 1.5}   # plain output KD: weight 0, eps 1
    """

    builds_own_network = True

    def __init__(self, teacher: TeacherConfig = TeacherConfig(), student: DiTConfig = lazy_instance(DiTConfig),
                 ofa: OFAConfig = OFAConfig(), objective: ObjectiveConfig = ObjectiveConfig(),
                 sampling: SamplingConfig | None = None, **options) -> None:  # fmt: skip
        super().__init__(objective=objective, sampling=sampling or SamplingConfig(), **options)
        self.teacher_config, self.student_config, self.ofa = teacher, DiTConfig.plain(student), ofa
        self.hold_teacher(sampling is not None)
        self.ofa_heads: OFAHeads | None = None

    def configure_model(self) -> None:
        """Build the student (fresh) and its exit heads once the teacher, whose objective the run adopts, is read."""
        if self.network is None:
            teacher = self.teacher
            student = self.student_config.build().to(self.device)
            if (student.input_size, student.in_channels) != (teacher.input_size, teacher.in_channels):
                raise ValueError(f"model.student sees {student.in_channels}x{student.input_size}^2 inputs, the teacher "
                                 f"{teacher.in_channels}x{teacher.input_size}^2; match input_size and in_channels")  # fmt: skip
            check_conditions(student.config, teacher.config)
            self.attach(student.train())
            if self.ofa.weight:
                self.ofa_heads = OFAHeads.build(student, self.ofa.stages, self.ofa.head_blocks)
            self.summary["ofa"] = {"stages": self.ofa_heads.stages if self.ofa_heads is not None else [],
                                   "teacher": self.describe(teacher), "student": self.describe(student)}  # fmt: skip
        super().configure_model()

    @staticmethod
    def describe(network: DiT) -> dict:
        return {"block": network.config.block, "trunk": network.config.trunk, "blocks": network.depth,
                "parameters": parameter_count(network), "flops_per_image": flops_per_image(network)}  # fmt: skip

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters and the exit heads'."""
        heads = list(self.ofa_heads.parameters()) if self.ofa_heads is not None else []
        return [p for p in self.network.parameters() if p.requires_grad] + heads

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        noised, drop = self.training_draws(images, labels)
        ofa = self.ofa
        terms, output = ofa_losses(self.network, self.teacher, self.ofa_heads, noised.xt, noised.model_t, labels,
                                   self.objective.target(images, noised), weight=ofa.weight,
                                   output_weight=ofa.output_weight, eps=ofa.eps, temperature=ofa.temperature,
                                   force_drop_ids=drop)  # fmt: skip
        terms["loss"] = terms["loss_kd_output"] + terms["loss_kd_ofa"]
        if ofa.task_weight:
            task = self.objective.losses(output, images, noised)
            terms.update({name: value for name, value in task.items() if name != "loss"})
            terms["loss"] = terms["loss"] + ofa.task_weight * task["loss"]
        return terms
