"""Elastic-DiT: open at init, forced-open full width = plain block, skipped = identity, masked == sliced, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ditlab.methods.dynamic.export import dynamic_flops, export


def test_at_init_every_block_is_open_at_full_width_and_the_output_is_bitwise_the_plain_dit(tiny_dit, dit_inputs,
                                                                                           make_dynamic):  # fmt: skip
    plain = tiny_dit()
    dynamic = make_dynamic(plain, "elastic")
    x, t, y = dit_inputs(plain, size=4)
    assert torch.equal(dynamic(x, t, y), plain(x, t, y))
    details = dynamic.trunk.last.details
    torch.testing.assert_close(details["open_prob"], torch.full_like(details["open_prob"], 0.7), atol=0.02, rtol=0)
    assert (details["width"] == 1).all() and torch.equal(dynamic.trunk.last.ratio, torch.ones(4))


def test_a_forced_open_router_at_full_width_equals_the_plain_block_and_a_closed_one_the_identity(
        tiny_dit, dit_inputs, make_dynamic, scramble):  # fmt: skip
    plain = tiny_dit()
    dynamic = make_dynamic(plain, "elastic")
    x, t, y = dit_inputs(plain, size=3)
    for router in dynamic.trunk.routers:
        scramble(router, seed=3, std=0.5)
        with torch.no_grad():
            router.skip.weight.zero_()
            router.width.weight.zero_()
            router.width.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
            router.skip.bias.fill_(20.0)  # forced open
    for form in ("sliced", "masked"):
        dynamic.trunk.set_form(form)
        assert torch.equal(dynamic(x, t, y), plain(x, t, y))
        dynamic.trunk.train()  # the straight-through gate of a forced-open block is exactly 1 too
        assert torch.equal(dynamic(x, t, y, force_drop_ids=torch.zeros_like(y)), plain(x, t, y))
        dynamic.trunk.eval()
    for router in dynamic.trunk.routers:
        router.skip.bias.data.fill_(-20.0)  # forced closed: every block passes its input through
    tokens, cond = plain.embed(x, t, y)
    assert torch.equal(dynamic.trunk(dynamic, tokens, cond, t), tokens)


def test_masked_and_sliced_paths_agree_for_random_router_states_and_flops_are_measured(
        tiny_dit, dit_inputs, make_dynamic, scramble, counted_attention):  # fmt: skip
    plain = counted_attention(tiny_dit())
    for seed in range(3):
        dynamic = counted_attention(make_dynamic(plain, "elastic"))
        for index, router in enumerate(dynamic.trunk.routers):
            scramble(router, seed=seed * 10 + index, std=0.4)
        x, t, y = dit_inputs(plain, size=8, seed=seed)
        dynamic.trunk.set_form("masked")
        masked = dynamic(x, t, y)
        details = dynamic.trunk.last.details
        assert not details["open"].all() and (details["width"] < 1).any()
        dynamic.trunk.set_form("sliced")
        with FlopCounterMode(display=False) as counter:
            sliced = dynamic(x, t, y)
        torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
        assert counter.get_total_flops() == int(dynamic_flops(dynamic).sum())
        torch.testing.assert_close(export(dynamic)(x, t, y), masked, rtol=1e-5, atol=1e-5)


def test_widths_that_do_not_cut_whole_channels_are_one_line(tiny_dit, make_dynamic):
    with pytest.raises(ValueError, match="widths=.*whole channels"):
        make_dynamic(tiny_dit(), "elastic", widths=[0.3, 1.0])
    with pytest.raises(ValueError, match="end at 1.0"):
        make_dynamic(tiny_dit(), "elastic", widths=[0.25, 0.5])
