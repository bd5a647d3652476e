"""Grafting: self-grafts are identities, parallel pairs reduce to a block, stage 1's cache and regression, the
block plans, and a grafted checkpoint that reloads, samples and refuses diffusers export in one line."""

from __future__ import annotations

import pytest
import torch

from ditlab.methods.graft import graft_operator, parallel_pairs, select_blocks
from ditlab.methods.graft.stage1 import (
    Stage1Config,
    cache_operator_io,
    cache_pair_io,
    regress_operators,
    regress_pairs,
    regression_loss,
)
from ditlab.models import interop
from ditlab.models.config import DiTConfig


def test_self_graft_leaves_the_model_identical(tiny_dit, dit_inputs):
    teacher = tiny_dit(input_size=8)
    x, t, y = dit_inputs(teacher)
    expected = teacher(x, t, y)
    same = graft_operator(teacher, "full")
    torch.testing.assert_close(same(x, t, y), expected, rtol=0, atol=0)
    covering = graft_operator(teacher, "local", {"radius": 8})  # a disc over the whole 4x4 grid
    torch.testing.assert_close(covering(x, t, y), expected, rtol=1e-5, atol=1e-5)
    partial = graft_operator(teacher, "window", {"window": 1}, blocks=[1, 3])
    assert [b.attn.operator_name for b in partial.blocks] == ["full", "window", "full", "window", "full", "full"]
    assert (partial(x, t, y) - expected).abs().max() > 1e-4  # a real graft changes the network


def test_parallel_pair_with_second_update_zeroed_is_the_first_block(tiny_dit, dit_inputs):
    teacher = tiny_dit(input_size=8)
    paired = parallel_pairs(teacher)
    assert paired.depth == 3 and paired.config.block == "parallel-pair"
    x, t, y = dit_inputs(teacher)
    tokens, cond = teacher.embed(x, t, y)
    pair = paired.blocks[0]
    with torch.no_grad():
        pair.second.adaLN_modulation[-1].weight.zero_()
        pair.second.adaLN_modulation[-1].bias.zero_()  # gates 0: the second block's update is 0
    torch.testing.assert_close(pair(tokens, cond), teacher.blocks[0](tokens, cond), rtol=0, atol=1e-6)
    first, second = paired.blocks[1].forward_halves(tokens, cond)
    torch.testing.assert_close(paired.blocks[1](tokens, cond), tokens + first + second, rtol=1e-5, atol=1e-5)


def test_stage1_cache_matches_a_live_hook_and_regression_lowers_the_error(tiny_dit, dit_inputs):
    teacher = tiny_dit(input_size=8)
    x, t, y = dit_inputs(teacher, size=8)
    cache = cache_operator_io(teacher, x, t, y, blocks=[0, 2], batch_size=3)
    seen = {}
    handle = teacher.blocks[2].attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out[0]))
    teacher(x, t, y)
    handle.remove()
    student = graft_operator(teacher, "local", {"radius": 1.5}, blocks=[0, 2])
    live = regression_loss(student.blocks[2].attn(seen["x"])[0], seen["y"], "l1")
    cached = regression_loss(student.blocks[2].attn(cache.inputs[2])[0], cache.outputs[2], "l1")
    torch.testing.assert_close(cached, live)
    report = regress_operators(student, cache, Stage1Config(steps=30, lr=3e-3, batch_size=8))
    assert all(r["mse_after"] < 0.8 * r["mse_before"] for r in report.values()), report


@pytest.mark.parametrize("loss", ["l2", "huber"])
def test_gate_scaled_losses_weight_by_the_gate(loss):
    prediction, target = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    gate = torch.rand(2, 4)
    scaled = regression_loss(prediction, target, loss, gate=gate)
    assert torch.allclose(scaled, regression_loss(prediction * gate[:, None], target * gate[:, None], loss))
    with pytest.raises(ValueError, match="model.stage1.loss='l3'; choices"):
        regression_loss(prediction, target, "l3")


def test_pair_regression_fits_the_sequential_pair(tiny_dit, dit_inputs):
    teacher = tiny_dit(input_size=8)
    x, t, y = dit_inputs(teacher, size=8)
    paired = parallel_pairs(teacher)
    report = regress_pairs(paired, cache_pair_io(teacher, x, t, y), Stage1Config(steps=30, lr=2e-3, batch_size=8))
    assert all(r["mse_after"] < r["mse_before"] for r in report.values()), report


def test_block_plans():
    assert select_blocks("odd", 6) == [0, 2, 4] == select_blocks(0.5, 6)
    assert select_blocks("even", 6) == [1, 3, 5] and select_blocks("all", 3) == [0, 1, 2]
    assert select_blocks(0.75, 4) == [0, 1, 2] and select_blocks([3, 1], 4) == [1, 3]
    with pytest.raises(ValueError, match=r"model.graft.blocks has \[9\] outside 0..3"):
        select_blocks([9], 4)
    with pytest.raises(ValueError, match="use all, odd, even, a fraction"):
        select_blocks("most", 4)


def test_grafted_networks_reload_and_refuse_diffusers_in_one_line(tiny_dit, tmp_path):
    teacher = tiny_dit(input_size=8)
    for student in (graft_operator(teacher, "hyena", {"variant": "se", "layout": "2d"}, [0, 1]),
                    parallel_pairs(teacher)):  # fmt: skip
        rebuilt = DiTConfig.from_dict(student.config.to_dict()).build()
        rebuilt.load_state_dict(student.state_dict())
        with pytest.raises(ValueError, match="export it with `ditlab convert --format safetensors`") as error:
            interop.check_exportable(student)
        assert "\n" not in str(error.value)
