"""Depth and width pruning: exact reproduction when nothing is removed, valid networks, the right units go."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ditlab.checkpoint import network_from_checkpoint
from ditlab.methods.compress.prune import (
    block_groups,
    prune_depth,
    prune_width,
    reinitialize,
    segments,
    taylor_scores,
    unit_scores,
)
from ditlab.models.budget import flops_per_image, parameter_count
from ditlab.models.dit import DiT
from ditlab.models.taps import run_blocks


@pytest.fixture(scope="module")
def teacher_dit(tiny_dit):
    """The tiny digits DiT (6 blocks, 2 heads) with its adaLN and output layers randomised at std 0.2."""
    return partial(tiny_dit, std=0.2)


# --- segments -----------------------------------------------------------------------------------------


def test_block_groups_and_segments():
    assert block_groups(6, [1, 4]) == {1: [0, 2, 3], 4: [5]}  # blocks before the first kept go to it
    assert block_groups(6, [0, 2, 3, 5]) == {0: [1], 2: [], 3: [4], 5: []}
    assert block_groups(6, [4, 1]) == block_groups(6, [1, 4])  # order of the list does not matter
    assert block_groups(3, [0, 1, 2]) == {0: [], 1: [], 2: []}
    assert segments(6, [1, 4]) == [(0, 3), (4, 5)]
    assert segments(6, [0, 2, 3, 5]) == [(0, 1), (2, 2), (3, 4), (5, 5)]
    owned = sorted(j for kept, group in block_groups(12, [0, 3, 4, 9]).items() for j in [kept, *group])
    assert owned == list(range(12))


@pytest.mark.parametrize(
    ("keep", "message"),
    [([0, 2, 2], r"blocks \[2\] more than once"), ([0, 6], r"indices \[6\] outside 0..5"),
     ([-1, 3], r"indices \[-1\] outside"), ([], "keep is empty")],
)  # fmt: skip
def test_prune_depth_rejects_bad_keep(keep, message, teacher_dit):
    with pytest.raises(ValueError, match=message) as error:
        prune_depth(teacher_dit(), keep)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="unknown depth init 'middle'"):
        prune_depth(teacher_dit(), [0, 1], init="middle")


# --- depth ----------------------------------------------------------------------------------------------


def test_copy_all_blocks_reproduces_teacher_and_leaves_it_untouched(teacher_dit, dit_inputs):
    teacher = teacher_dit()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = prune_depth(teacher, range(6))
    x, t, y = dit_inputs(teacher)
    assert torch.equal(student.eval()(x, t, y), teacher(x, t, y))
    assert not student.training or teacher.training
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for n, p in student.named_parameters() if n != "pos_embed")


def test_copy_subset_equals_teacher_with_the_other_blocks_skipped(teacher_dit, dit_inputs):
    teacher = teacher_dit()
    student = prune_depth(teacher, [0, 2, 5])
    assert student.depth == 3 and student.config.depth == 3
    x, t, y = dit_inputs(teacher)
    expected = run_blocks(teacher, x, t, y, skip=[1, 3, 4]).output
    assert torch.equal(student(x, t, y), expected)
    assert torch.equal(student.blocks[1].attn.qkv.weight, teacher.blocks[2].attn.qkv.weight)


def reload_through_checkpoint(network: DiT) -> DiT:
    checkpoint = {"state_dict": {f"ema.{k}": v for k, v in network.state_dict().items()},
                  "ditlab": {"dit_config": network.config.to_dict()}}  # fmt: skip
    return network_from_checkpoint(checkpoint)


@pytest.mark.parametrize("edit", ["depth", "width", "both"])
def test_pruned_network_config_rebuilds_it_and_checkpoint_reload_works(edit, teacher_dit, dit_inputs):
    teacher = teacher_dit(num_heads=4)
    pruned = teacher
    if edit in ("depth", "both"):
        pruned = prune_depth(pruned, [0, 3, 5], init="average")
    if edit in ("width", "both"):
        pruned = prune_width(pruned, num_heads=3, mlp_hidden=70)
    pruned.eval()
    rebuilt = DiT(pruned.config)
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    reloaded = reload_through_checkpoint(pruned)
    x, t, y = dit_inputs(teacher)
    assert torch.equal(reloaded(x, t, y), pruned(x, t, y))
    assert parameter_count(reloaded) == parameter_count(pruned) < parameter_count(teacher)


def test_average_of_identical_blocks_reproduces_that_block(teacher_dit):
    teacher = teacher_dit()
    for j in (2, 3):
        teacher.blocks[j].load_state_dict(teacher.blocks[1].state_dict())
    student = prune_depth(teacher, [0, 1, 4, 5], init="average")  # block 1 owns blocks 2 and 3
    for key, value in student.blocks[1].state_dict().items():
        torch.testing.assert_close(value, teacher.blocks[1].state_dict()[key], atol=1e-7, rtol=1e-6)
    # different blocks: the uniform mean of the segment, or the given (normalised) weights
    student = prune_depth(teacher_dit(), [1, 4], init="average")  # segments {0..3} and {4, 5}
    fresh = teacher_dit()
    expected = sum(fresh.blocks[j].mlp.fc1.weight for j in range(4)) / 4
    torch.testing.assert_close(student.blocks[0].mlp.fc1.weight, expected)
    copied = prune_depth(fresh, [1, 4], init="average", weights={1: [0, 2, 0, 0], 4: [1, 1]})
    torch.testing.assert_close(copied.blocks[0].attn.qkv.weight, fresh.blocks[1].attn.qkv.weight)
    with pytest.raises(ValueError, match="4 numbers with a positive sum"):
        prune_depth(fresh, [1, 4], init="average", weights={1: [1, 1]})


def test_random_init_and_reinitialize_reset_blocks_to_identity(teacher_dit, dit_inputs):
    teacher = teacher_dit()
    student = prune_depth(teacher, [0, 3], init="random")
    x, t, y = dit_inputs(teacher)
    tokens, cond = student.embed(x, t, y)
    assert all(torch.equal(block(tokens, cond), tokens) for block in student.blocks)
    assert torch.equal(student.final_layer.linear.weight, teacher.final_layer.linear.weight)
    assert not torch.equal(student.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    edited = teacher_dit()
    reinitialize(edited, [2])
    assert torch.equal(edited.blocks[2](tokens, cond), tokens)
    assert not torch.equal(edited.blocks[1](tokens, cond), tokens)
    assert torch.equal(edited.blocks[1].mlp.fc1.weight, teacher.blocks[1].mlp.fc1.weight)
    with pytest.raises(ValueError, match=r"blocks \[6\] are outside 0..5"):
        reinitialize(edited, [6])


# --- width ----------------------------------------------------------------------------------------------


def test_width_pruning_that_keeps_everything_reproduces_teacher(teacher_dit, dit_inputs):
    teacher = teacher_dit(num_heads=4)
    student = prune_width(teacher, num_heads=4, mlp_hidden=128)
    x, t, y = dit_inputs(teacher)
    assert torch.equal(student(x, t, y), teacher(x, t, y))
    assert student.config.head_dim is None and student.config.mlp_hidden is None
    with pytest.raises(ValueError, match="num_heads=5 must be in 1..4"):
        prune_width(teacher, num_heads=5)


def test_pruning_a_near_zero_head_and_channel_barely_changes_the_output(teacher_dit, dit_inputs):
    teacher = teacher_dit(num_heads=4)
    with torch.no_grad():
        for block in teacher.blocks:  # head 1 and MLP channel 7 are (almost) dead in every block
            block.attn.qkv.weight.view(3, 4, 8, 32)[:, 1] *= 1e-6
            block.attn.proj.weight.view(32, 4, 8)[:, 1] *= 1e-6
            block.mlp.fc1.weight[7] *= 1e-6
            block.mlp.fc2.weight[:, 7] *= 1e-6
    student = prune_width(teacher, num_heads=3, mlp_hidden=127)
    assert student.blocks[0].attn.num_heads == 3 and student.blocks[0].attn.head_dim == 8
    kept_rows = teacher.blocks[0].attn.qkv.weight.view(3, 4, 8, 32)[:, [0, 2, 3]].reshape(72, 32)
    assert torch.equal(student.blocks[0].attn.qkv.weight, kept_rows)
    x, t, y = dit_inputs(teacher)
    reference = teacher(x, t, y)
    change = (student(x, t, y) - reference).abs().max()
    assert change < 1e-4 * reference.abs().max()
    # removing a live head instead changes the output clearly
    lively = teacher_dit(num_heads=4)
    assert (prune_width(lively, num_heads=3)(x, t, y) - lively(x, t, y)).abs().max() > 1e-2


def test_magnitude_keeps_the_larger_units(teacher_dit):
    teacher = teacher_dit(num_heads=4)
    with torch.no_grad():
        teacher.blocks[0].attn.proj.weight.view(32, 4, 8)[:, 2] *= 10
        teacher.blocks[1].attn.qkv.weight.view(3, 4, 8, 32)[:, 0] *= 10
        teacher.blocks[0].mlp.fc2.weight[:, 5] *= 10
    heads, channels = unit_scores(teacher)
    assert heads[0].argmax() == 2 and heads[1].argmax() == 0 and channels[0].argmax() == 5
    block = teacher.blocks[0]
    expected = torch.cat([block.attn.qkv.weight.view(3, 4, 8, 32)[:, 2].flatten(),
                          block.attn.qkv.bias.view(3, 4, 8)[:, 2].flatten(),
                          block.attn.proj.weight.view(32, 4, 8)[:, 2].flatten()]).norm()  # fmt: skip
    torch.testing.assert_close(heads[0][2], expected)
    l1 = unit_scores(teacher, norm=1)[1][0][5]
    expected = (
        block.mlp.fc1.weight[5].abs().sum()
        + block.mlp.fc1.bias[5].abs()
        + block.mlp.fc2.weight[:, 5].abs().sum()
    )
    torch.testing.assert_close(l1, expected)
    student = prune_width(teacher, num_heads=1, mlp_hidden=1)
    assert torch.equal(student.blocks[0].attn.proj.weight, block.attn.proj.weight[:, 16:24])
    assert torch.equal(student.blocks[0].mlp.fc1.weight, block.mlp.fc1.weight[5:6])


def test_taylor_scores_are_abs_weight_times_grad_summed_per_unit(teacher_dit):
    teacher = teacher_dit(num_heads=4, depth=2)
    generator = torch.Generator().manual_seed(3)
    grads = {n: torch.randn(p.shape, generator=generator) for n, p in teacher.named_parameters()}
    heads, channels = unit_scores(teacher, "taylor", grads)
    block, prefix = teacher.blocks[1], "blocks.1."

    def term(name: str) -> torch.Tensor:
        return (dict(block.named_parameters())[name] * grads[prefix + name]).abs()

    for h in range(4):
        rows = [part * 32 + h * 8 + j for part in range(3) for j in range(8)]
        expected = term("attn.qkv.weight")[rows].sum() + term("attn.qkv.bias")[rows].sum()
        expected += term("attn.proj.weight")[:, h * 8 : (h + 1) * 8].sum()
        torch.testing.assert_close(heads[1][h], expected)
    expected = term("mlp.fc1.weight")[9].sum() + term("mlp.fc1.bias")[9] + term("mlp.fc2.weight")[:, 9].sum()
    torch.testing.assert_close(channels[1][9], expected)
    with pytest.raises(ValueError, match="needs grads"):
        unit_scores(teacher, "taylor")


def test_taylor_scores_accumulate_gradients_and_restore_flags(teacher_dit, dit_inputs):
    teacher = teacher_dit(depth=2)
    teacher.requires_grad_(False)  # a frozen teacher still gets scored
    batches = [dit_inputs(teacher, seed=s) for s in (4, 5)]

    def loss_fn(dit: DiT, inputs) -> torch.Tensor:
        return dit(*inputs).square().mean()

    expected = []
    for inputs in batches:
        probe = teacher_dit(depth=2)
        loss_fn(probe, inputs).backward()
        expected.append(dict(probe.named_parameters())["blocks.1.mlp.fc1.weight"].grad)
    plain = taylor_scores(teacher, loss_fn, batches, absolute=False)
    absolute = taylor_scores(teacher, loss_fn, batches)
    torch.testing.assert_close(plain["blocks.1.mlp.fc1.weight"], (expected[0] + expected[1]) / 2)
    torch.testing.assert_close(
        absolute["blocks.1.mlp.fc1.weight"], (expected[0].abs() + expected[1].abs()) / 2
    )
    assert "pos_embed" not in plain
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    pruned = prune_width(teacher, num_heads=1, score="taylor", grads=absolute)
    assert pruned.blocks[0].attn.num_heads == 1


# --- budgets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [False, True])
def test_flops_match_flop_counter(width, teacher_dit, dit_inputs):
    dit = teacher_dit(num_heads=4, depth=3)
    if width:
        dit = prune_width(dit, num_heads=3, mlp_hidden=50)
    x, t, y = dit_inputs(dit, 2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        # explicit attention maps, so the q k^T and attn v products are plain matmuls the counter sees
        run_blocks(dit, x, t, y, attention=range(dit.depth))
    assert counter.get_total_flops() == 2 * flops_per_image(dit)


def test_flops_and_parameters_scale_with_depth():
    config = {"input_size": 16, "patch_size": 4, "in_channels": 1, "hidden_size": 128, "num_heads": 4,
              "num_classes": 10}  # fmt: skip
    deep, shallow = DiT(depth=12, **config), DiT(depth=6, **config)
    block_params = parameter_count(deep.blocks[0])
    assert parameter_count(deep) - parameter_count(shallow) == 6 * block_params
    tokens, dim = 16, 128
    block_flops = 2 * (
        6 * dim * dim + tokens * (3 * dim * dim + dim * dim + 8 * dim * dim) + 2 * tokens * tokens * dim
    )
    assert flops_per_image(deep) - flops_per_image(shallow) == 6 * block_flops
    assert flops_per_image(prune_depth(deep, range(0, 12, 2))) == flops_per_image(shallow)


@pytest.mark.parametrize(
    ("preset", "gflops"), [("S/2", 6.06), ("B/2", 23.01), ("L/2", 80.71), ("XL/2", 118.64)]
)
def test_flops_agree_with_the_dit_paper(preset, gflops):
    """The DiT paper's "Gflops" (fvcore) are multiply-accumulates: half of ``flops_per_image`` at 256x256."""
    with torch.device("meta"):
        dit = DiT.from_preset(preset)
    assert flops_per_image(dit) / 2e9 == pytest.approx(gflops, rel=2e-3)
