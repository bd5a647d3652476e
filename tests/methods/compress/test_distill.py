"""Distillation losses: the menu's invariances, zero loss for exact students, teacher-forced independence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditlab.methods.compress.distill import (
    FEATURE_LOSSES,
    distillation_losses,
    feature_loss,
    layer_losses,
    matched_layers,
)
from ditlab.methods.compress.prune import prune_depth
from ditlab.models.dit import DiT


@pytest.fixture
def teacher(tiny_dit) -> DiT:
    """The brief's tiny DiT (8x8x1, patch 2, width 32, depth 6, 2 heads) with random adaLN and output layers."""
    return tiny_dit(std=0.2).requires_grad_(False)


# --- the feature-loss menu ------------------------------------------------------------------------------


def features(seed: int = 0, shape=(3, 5, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_direction_loss_is_two_minus_two_cos_and_ignores_student_scale():
    student, teacher = features()
    cos = F.cosine_similarity(student, teacher, dim=-1)
    direction = feature_loss(student, teacher, "direction")
    torch.testing.assert_close(direction, (2 - 2 * cos).mean())
    scales = torch.rand(3, 5, 1, generator=torch.Generator().manual_seed(1)) * 10 + 0.01
    torch.testing.assert_close(feature_loss(student * scales, teacher, "direction"), direction)
    assert not torch.allclose(
        feature_loss(student * scales, teacher, "mse"), feature_loss(student, teacher, "mse")
    )
    torch.testing.assert_close(feature_loss(student, teacher, "cosine"), (1 - cos).mean())


def test_the_magnitude_term_sees_the_rescaling_the_direction_loss_ignores():
    """PPCL's direction loss is blind to a replacement that rescales its tokens; the magnitude term is the squared
    relative error of each token's norm, so a student at twice the teacher's scale pays exactly 1 more."""
    student, teacher = features()
    direction = feature_loss(student, teacher, "direction")
    norms = student.norm(dim=-1), teacher.norm(dim=-1)
    expected = direction + ((norms[0] - norms[1]) / norms[1]).square().mean()
    torch.testing.assert_close(feature_loss(student, teacher, "direction_magnitude"), expected)
    torch.testing.assert_close(feature_loss(2 * teacher, teacher, "direction_magnitude"), torch.tensor(1.0))
    assert feature_loss(2 * teacher, teacher, "direction") < 1e-6


def test_normalized_mse_is_scale_free_and_per_sample():
    student, teacher = features()
    value = feature_loss(student, teacher, "normalized_mse")
    expected = torch.stack(
        [(s - t).square().sum() / t.square().sum() for s, t in zip(student, teacher)]
    ).mean()
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(feature_loss(student * 7.5, teacher * 7.5, "normalized_mse"), value)
    plain = torch.stack([(s - t).square().sum() / t.norm() for s, t in zip(student, teacher)]).mean()
    torch.testing.assert_close(feature_loss(student, teacher, "normalized_mse", squared_norm=False), plain)
    # the teacher norm is a constant: no gradient reaches the teacher through the denominator
    teacher.requires_grad_(True)
    feature_loss(teacher.detach() * 1.1, teacher, "normalized_mse").backward()
    target = teacher.detach()
    manual = 2 * (target - target * 1.1) / target.flatten(1).square().sum(1)[:, None, None]
    torch.testing.assert_close(teacher.grad, manual / 3)


def test_plain_and_l1_losses_and_unknown_kind():
    student, teacher = features()
    torch.testing.assert_close(feature_loss(student, teacher, "mse"), F.mse_loss(student, teacher))
    unit = F.normalize(student, dim=-1) - F.normalize(teacher, dim=-1)
    torch.testing.assert_close(feature_loss(student, teacher, "normalized_l1"), unit.abs().sum(-1).mean())
    for kind in FEATURE_LOSSES:
        assert feature_loss(teacher, teacher, kind) < 1e-6
    with pytest.raises(ValueError, match="unknown feature loss 'kl'; choices"):
        feature_loss(student, teacher, "kl")
    with pytest.raises(ValueError, match="differ in shape"):
        feature_loss(student, teacher[..., :8])


def test_matched_layers_are_segment_ends():
    assert matched_layers([0, 2, 3], 6) == {0: 1, 1: 2, 2: 5}
    assert matched_layers([1, 4], 6) == {0: 3, 1: 5}
    assert matched_layers(range(4), 4) == {0: 0, 1: 1, 2: 2, 3: 3}


# --- the engine -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher_forced", [False, True])
def test_unpruned_copy_has_zero_losses_even_with_label_dropout(teacher_forced, teacher, dit_inputs):
    student = prune_depth(teacher, range(6)).train()
    # every label dropped: the eval-mode teacher must see the null class too
    student.y_embedder.dropout_prob = 1.0
    x, t, y = dit_inputs(teacher, 4)
    for kind in FEATURE_LOSSES:
        losses = distillation_losses(student, teacher, x, t, y, range(6), feature_kind=kind,
                                     teacher_forced=teacher_forced)  # fmt: skip
        assert set(losses) == {"loss_kd_output", "loss_kd_feature"}
        assert losses["loss_kd_output"] == 0 and losses["loss_kd_feature"] < 1e-6, kind
    assert student.y_embedder.training and not teacher.y_embedder.training
    # the same student on its own labels but the teacher on null labels would differ
    null = torch.full_like(y, 10)
    assert not torch.allclose(teacher(x, t, y), teacher(x, t, null))


def test_one_block_segments_have_exactly_zero_teacher_forced_loss(teacher, dit_inputs):
    keep = [0, 2, 3, 5]  # segments [0, 1], [2], [3, 4], [5]
    student = prune_depth(teacher, keep)
    losses, output = layer_losses(student, teacher, *dit_inputs(teacher, 4), keep, teacher_forced=True)
    assert output is None
    assert losses[1] == 0 and losses[3] == 0
    assert losses[0] > 1e-3 and losses[2] > 1e-3
    # without teacher forcing the error of segment 0 carries into block 1
    chained, _ = layer_losses(student, teacher, *dit_inputs(teacher, 4), keep)
    assert chained[1] > 1e-3


def test_teacher_forced_losses_are_independent_across_student_blocks(teacher, dit_inputs):
    keep = [0, 2, 4]
    student = prune_depth(teacher, keep)
    inputs = dit_inputs(teacher, 4)
    before, _ = layer_losses(student, teacher, *inputs, keep, teacher_forced=True)
    with torch.no_grad():
        student.blocks[1].mlp.fc1.weight.add_(torch.randn_like(student.blocks[1].mlp.fc1.weight))
    after, _ = layer_losses(student, teacher, *inputs, keep, teacher_forced=True)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.equal(after[1], before[1])
    # gradients of block 2's loss reach no other block
    after[2].backward()
    assert student.blocks[2].mlp.fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for block in student.blocks[:2] for p in block.parameters())
    chained, _ = layer_losses(student, teacher, *inputs, keep)  # without forcing, block 1 feeds block 2
    assert not torch.allclose(chained[2], before[2])


def test_weights_layers_and_skipped_terms(teacher, dit_inputs):
    keep = [0, 3]
    student = prune_depth(teacher, keep)
    inputs = dit_inputs(teacher, 4)
    base = distillation_losses(student, teacher, *inputs, keep)
    doubled = distillation_losses(student, teacher, *inputs, keep, output_weight=2.0, feature_weight=3.0)
    torch.testing.assert_close(doubled["loss_kd_output"], 2 * base["loss_kd_output"])
    torch.testing.assert_close(doubled["loss_kd_feature"], 3 * base["loss_kd_feature"])
    per_layer, output = layer_losses(student, teacher, *inputs, keep, with_output=True)
    torch.testing.assert_close(base["loss_kd_feature"], (per_layer[0] + per_layer[1]) / 2)
    torch.testing.assert_close(base["loss_kd_output"], output)
    only_first = distillation_losses(student, teacher, *inputs, keep, layers=[0], output_weight=0.0)
    assert only_first["loss_kd_output"] == 0
    torch.testing.assert_close(only_first["loss_kd_feature"], per_layer[0])
    with pytest.raises(ValueError, match="student has depth 2 but keep lists 3 blocks"):
        distillation_losses(student, teacher, *inputs, [0, 3, 4])
    with pytest.raises(ValueError, match=r"layers \[2\] are outside 0..1"):
        distillation_losses(student, teacher, *inputs, keep, layers=[2])


@pytest.mark.parametrize("teacher_forced", [False, True])
def test_a_few_adamw_steps_on_a_depth_halved_student_reduce_the_losses(teacher_forced, teacher, dit_inputs):
    keep = [0, 2, 4]
    student = prune_depth(teacher, keep).train()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    inputs = dit_inputs(teacher, 16, seed=7)
    history = []
    for _ in range(30):
        losses = distillation_losses(student, teacher, *inputs, keep, teacher_forced=teacher_forced)
        total = losses["loss_kd_output"] + losses["loss_kd_feature"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({k: float(v) for k, v in losses.items()})
    for key in ("loss_kd_output", "loss_kd_feature"):
        assert history[-1][key] < 0.7 * history[0][key], (key, history[0][key], history[-1][key])


def test_output_kd_on_prediction_channels_ignores_the_learned_variance(teacher, dit_inputs):
    teacher = teacher.requires_grad_(False)
    student = prune_depth(teacher, list(range(teacher.depth)))
    channels = teacher.in_channels
    assert teacher.out_channels == 2 * channels, "the tiny DiT learns sigma"
    with torch.no_grad():  # change only the variance half of the output
        rows = student.final_layer.linear.weight.shape[0]
        per_patch = rows // teacher.out_channels
        student.final_layer.linear.bias.view(per_patch, teacher.out_channels)[:, channels:].add_(1.0)
    x, t, y = dit_inputs(teacher)
    kwargs = {"feature_weight": 0.0, "output_weight": 1.0}
    prediction = distillation_losses(student, teacher, x, t, y, list(range(teacher.depth)), output_channels=channels,
                                     **kwargs)  # fmt: skip
    everything = distillation_losses(student, teacher, x, t, y, list(range(teacher.depth)), **kwargs)
    assert prediction["loss_kd_output"] == 0 and everything["loss_kd_output"] > 0
