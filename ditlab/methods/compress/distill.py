"""Distillation losses for a pruned student DiT against its teacher: a small menu, one engine.

- Feature losses (the Distiller menu, arXiv 2109.11105): plain ``mse``; ``normalized_mse`` (LAPTOP-Diff,
  arXiv 2404.11098: ``||F_S - F_T||^2 / ||F_T||^2`` per sample, so large-magnitude layers do not dominate);
  ``direction`` (PPCL, arXiv 2511.16156: MSE of per-token unit vectors, ``2 - 2 cos``); ``cosine``; and
  ``normalized_l1`` (PPCL's width phase: L1 between per-token L2-normalised features); ``direction_magnitude``
  (the direction loss plus PPCL's optional magnitude term, [interp] the squared relative error of each token's norm,
  ``((|S| - |T|) / |T|)^2``: the direction loss alone leaves a replacement block free to rescale its output, and
  the next block, trained on the teacher's scale, then reads a stream of the wrong size).
- Layer mapping (PPCL's interval end, also Amber-Image's layer-wise stage, arXiv 2602.17047): student block
  ``i`` is matched to the *output* of the last teacher block of the segment it stands for
  (:func:`ditlab.methods.compress.prune.segments`).
- Teacher forcing (PPCL's local phase): each student block gets the teacher's tokens entering its segment,
  so its error does not build up over depth and student blocks train independently.

Features are block outputs ``(B, N, D)``. The teacher runs once, without gradients, through
:func:`ditlab.models.taps.run_blocks`.

Text-to-image networks: the condition ``y`` may be ``TextFeatures`` (caption drop-out is shared like label
drop-out). An MM-DiT or FLUX block outputs the whole ``[text; image]`` sequence, so its feature loss covers both
streams [interp: Amber-Image and PPCL distil their dual-stream blocks' hidden states; we take both streams as one
sequence]; a PixArt block outputs image tokens only (its text is read from the condition).

A student of another architecture (DiT -> DiCo), whose blocks match none of the teacher's, is distilled with OFA-KD
(:mod:`ditlab.methods.compress.ofa_kd`): exit heads project its stages into the prediction space, where
:func:`prediction_kd` compares them with the teacher's (enhanced) prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ditlab.methods.compress.prune import segments
from ditlab.models.dit import DiT
from ditlab.models.taps import run_blocks

FEATURE_LOSSES = ("mse", "normalized_mse", "direction", "cosine", "normalized_l1", "direction_magnitude")


def _unit(features: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token L2-normalised features ``(..., D)``; ``eps`` guards zero tokens."""
    return features / features.norm(dim=-1, keepdim=True).clamp_min(eps)


def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str = "normalized_mse",
    eps: float = 1e-6,
    squared_norm: bool = True,
) -> torch.Tensor:
    """Scalar distance between features ``(B, N, D)`` (any ``(B, ..., D)``; tokens along the middle dims).

    ``mse``: mean of ``(S - T)^2``. ``normalized_mse``: per sample ``||S - T||^2 / ||T||^2`` (``/ ||T||`` with
    ``squared_norm=False``; the teacher norm is detached), averaged over the batch. ``direction``: mean over
    tokens of ``||S/|S| - T/|T|||^2 = 2 - 2 cos``. ``cosine``: mean over tokens of ``1 - cos``.
    ``normalized_l1``: mean over tokens of ``||S/|S| - T/|T|||_1``. ``direction_magnitude``: ``direction`` plus
    the mean over tokens of ``((|S| - |T|) / |T|)^2`` (the teacher norm detached).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} "
                         "differ in shape; match layers of the same width or add a projector")  # fmt: skip
    if kind == "mse":
        return (student - teacher).square().mean()
    if kind == "normalized_mse":
        error = (student - teacher).flatten(1).square().sum(1)
        norm = teacher.detach().flatten(1).norm(dim=1)
        norm = norm.square() if squared_norm else norm
        return (error / norm.clamp_min(eps)).mean()
    if kind in ("direction", "direction_magnitude"):
        direction = (_unit(student, eps) - _unit(teacher, eps)).square().sum(-1).mean()
        if kind == "direction":
            return direction
        target = teacher.detach().norm(dim=-1)
        return direction + ((student.norm(dim=-1) - target) / target.clamp_min(eps)).square().mean()
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1, eps=eps)).mean()
    if kind == "normalized_l1":
        return (_unit(student, eps) - _unit(teacher, eps)).abs().sum(-1).mean()
    raise ValueError(f"unknown feature loss {kind!r}; choices: {list(FEATURE_LOSSES)}")


def prediction_kd(student: torch.Tensor, teacher: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """Output KD: the mean of ``(out_S - out_T)^2`` over the first ``channels`` output channels (None: all), for
    ``(B, C, H, W)`` outputs of any two architectures (the depth-pruned student here, an OFA-KD exit head in
    :mod:`ditlab.methods.compress.ofa_kd`)."""
    part = slice(None, channels)
    return (student[:, part] - teacher[:, part]).square().mean()


def matched_layers(keep: Sequence[int], teacher_depth: int) -> dict[int, int]:
    """Student block ``i`` -> the teacher block whose output it should match: the last of its segment.

    ``matched_layers([0, 2, 3], 6) == {0: 1, 1: 2, 2: 5}``.
    """
    return {index: last for index, (_, last) in enumerate(segments(teacher_depth, keep))}


def shared_drop_ids(student: DiT, y, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One classifier-free drop-out ``(B,)`` for student and teacher, so both see the same null labels (or empty
    captions: ``y`` may be a text-conditioned network's ``TextFeatures``).

    Otherwise a training student drops labels its (eval-mode) teacher keeps and learns to match the
    conditional output on null labels. ``force_drop_ids`` (drawn by the module for the global batch) wins;
    else the student's embedder draws, in training mode only.
    """
    if force_drop_ids is not None:
        return force_drop_ids
    embedder = student.y_embedder
    device = y.device if isinstance(y, torch.Tensor) else y.tokens.device
    if embedder.training and embedder.dropout_prob > 0:
        return (torch.rand(len(y), device=device) < embedder.dropout_prob).long()
    return torch.zeros(len(y), dtype=torch.long, device=device)


def layer_losses(
    student: DiT,
    teacher: DiT,
    xt: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    keep: Sequence[int],
    *,
    feature_kind: str = "normalized_mse",
    layers: Sequence[int] | None = None,
    teacher_forced: bool = False,
    with_output: bool = False,
    force_drop_ids: torch.Tensor | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
    output_channels: int | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Per student block feature loss against its matched teacher output, and the output KD term.

    ``xt: (B, C, H, W)``, ``t: (B,)``, ``y: (B,)``. Returns ``({student block: scalar}, output loss or None)``;
    the output loss (``with_output``) is the mean of ``(out_S - out_T)^2`` over the first ``output_channels``
    output channels (None: all; LAPTOP-Diff distils the prediction, not a learned variance) and always comes
    from the ordinary (not teacher-forced) student pass. ``spans``: the ``(first, last)`` teacher blocks each
    student block stands for (PPCL's intervals); default :func:`segments` of ``keep``.
    """
    losses, output_loss, _ = _layer_losses(student, teacher, xt, t, y, keep, feature_kind=feature_kind, layers=layers,
                                           teacher_forced=teacher_forced, with_output=with_output,
                                           force_drop_ids=force_drop_ids, spans=spans,
                                           output_channels=output_channels)  # fmt: skip
    return losses, output_loss


def _layer_losses(
    student: DiT,
    teacher: DiT,
    xt: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    keep: Sequence[int],
    *,
    feature_kind: str = "normalized_mse",
    layers: Sequence[int] | None = None,
    teacher_forced: bool = False,
    with_output: bool = False,
    force_drop_ids: torch.Tensor | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
    output_channels: int | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """:func:`layer_losses` plus the student's output ``(B, C_out, H, W)`` when it was computed."""
    if feature_kind not in FEATURE_LOSSES:
        raise ValueError(f"unknown feature loss {feature_kind!r}; choices: {list(FEATURE_LOSSES)}")
    if student.depth != len(keep):
        raise ValueError(f"student has depth {student.depth} but keep lists {len(keep)} blocks; "
                         "pass the keep list the student was pruned with")  # fmt: skip
    bounds = segments(teacher.depth, keep) if spans is None else [tuple(span) for span in spans]
    if len(bounds) != student.depth:
        raise ValueError(f"student has depth {student.depth} but spans lists {len(bounds)} segments")
    layers = list(range(student.depth)) if layers is None else sorted(set(layers))
    outside = [index for index in layers if not 0 <= index < student.depth]
    if outside:
        raise ValueError(
            f"layers {outside} are outside 0..{student.depth - 1} for a student of depth {student.depth}"
        )
    if not layers and not with_output:
        return {}, None, None
    targets = {bounds[i][1] for i in layers}
    inputs = {bounds[i][0] - 1 for i in layers} if teacher_forced else set()
    drop = shared_drop_ids(student, y, force_drop_ids)
    with torch.no_grad():
        stop = None if with_output else max(targets | inputs)
        tapped = run_blocks(teacher, xt, t, y, hidden=targets | inputs, stop_after=stop, force_drop_ids=drop)
    output = student_output = None
    if teacher_forced:
        _, cond = student.embed(xt, t, y, drop)
        features = {i: student.blocks[i](tapped.hidden[bounds[i][0] - 1], cond) for i in layers}
        if with_output:
            student_output = student(xt, t, y, drop)
    else:
        stop = None if with_output else max(layers)
        student_tapped = run_blocks(student, xt, t, y, hidden=layers, stop_after=stop, force_drop_ids=drop)
        features = student_tapped.hidden
        student_output = student_tapped.output if with_output else None
    if student_output is not None:
        output = prediction_kd(student_output, tapped.output, output_channels)
    losses = {i: feature_loss(features[i], tapped.hidden[bounds[i][1]], feature_kind) for i in layers}
    return losses, output, student_output


def distillation_losses(
    student: DiT,
    teacher: DiT,
    xt: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    keep: Sequence[int],
    *,
    output_weight: float = 1.0,
    feature_weight: float = 1.0,
    feature_kind: str = "normalized_mse",
    layers: Sequence[int] | None = None,
    teacher_forced: bool = False,
    return_student_output: bool = False,
    force_drop_ids: torch.Tensor | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
    output_channels: int | None = None,
) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Weighted KD terms, ready to sum and log: ``loss_kd_output`` and ``loss_kd_feature`` (scalars).

    ``loss_kd_output = output_weight * mean (out_S - out_T)^2``; ``loss_kd_feature = feature_weight *`` the mean
    over ``layers`` (default all student blocks) of :func:`feature_loss` against :func:`matched_layers`. A term
    whose weight is 0 is not computed (a zero tensor), so the PPCL local phase
    (``teacher_forced=True, output_weight=0``) runs each student block once and no student head.
    ``return_student_output`` also returns the student's output, so a task loss needs no second pass.
    ``spans`` and ``output_channels`` as in :func:`layer_losses`.
    """
    losses, output, student_output = _layer_losses(
        student, teacher, xt, t, y, keep, feature_kind=feature_kind, layers=layers if feature_weight else [],
        teacher_forced=teacher_forced, with_output=bool(output_weight) or return_student_output,
        force_drop_ids=force_drop_ids, spans=spans, output_channels=output_channels,
    )  # fmt: skip
    zero = xt.new_zeros(())
    feature = torch.stack(list(losses.values())).mean() if losses else zero
    terms = {
        "loss_kd_output": output_weight * output if output is not None else zero,
        "loss_kd_feature": feature_weight * feature,
    }
    return (terms, student_output) if return_student_output else terms
