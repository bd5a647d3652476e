"""DyDiT: identity at init, masked == sliced == exported table, token gather/scatter, FLOPs, batch invariance."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ditlab.methods.dynamic import ops
from ditlab.methods.dynamic.export import dynamic_flops, export, plain_flops


@pytest.fixture
def random_routers(scramble):
    return lambda network, seed=0: randomize_routers(network, scramble, seed)


def randomize_routers(network, scramble, seed: int = 0) -> None:
    """Width routers whose masks vary with t; token routers that drop some tokens."""
    trunk = network.trunk
    for index, router in enumerate([*trunk.head_routers, *trunk.group_routers]):
        scramble(router, seed + index, std=0.3, bias=0.2)
    for index, router in enumerate(trunk.token_routers):
        scramble(router, seed + 100 + index, std=0.5, bias=0.3)


def test_every_mask_is_one_at_init_and_the_output_is_bitwise_the_plain_dit(tiny_dit, dit_inputs, make_dynamic):
    plain = tiny_dit()
    dynamic = make_dynamic(plain, "dydit")
    x, t, y = dit_inputs(plain, size=4)
    expected = plain(x, t, y)
    for form in ("sliced", "masked"):
        dynamic.trunk.set_form(form)
        assert torch.equal(dynamic(x, t, y), expected)
    details = dynamic.trunk.last.details
    assert (details["heads"] == plain.config.num_heads).all() and (details["tokens"] == 1).all()
    assert torch.equal(export(dynamic)(x, t, y), expected)
    dynamic.train()  # the straight-through value of an all-on mask is exactly 1 as well
    assert torch.equal(dynamic(x, t, y, force_drop_ids=torch.zeros_like(y)), plain(x, t, y))


def test_masked_sliced_and_exported_paths_agree_for_random_router_states(tiny_dit, dit_inputs, make_dynamic,
                                                                         random_routers):  # fmt: skip
    plain = tiny_dit()
    for seed in range(3):
        dynamic = make_dynamic(plain, "dydit")
        random_routers(dynamic, seed)
        x, t, y = dit_inputs(plain, size=6, seed=seed)
        t[3:] = t[0]  # rows sharing a timestep share a slice; the others each get their own
        dynamic.trunk.set_form("masked")
        masked = dynamic(x, t, y)
        heads = dynamic.trunk.last.details["heads"]
        assert (heads < plain.config.num_heads).any() and (dynamic.trunk.last.details["tokens"] < 1).any()
        dynamic.trunk.set_form("sliced")
        torch.testing.assert_close(dynamic(x, t, y), masked, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(export(dynamic)(x, t, y), masked, rtol=1e-5, atol=1e-5)


def test_token_gather_scatter_equals_multiplying_by_the_mask():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    tokens = torch.randn(3, 5, 8)
    keep = torch.rand(3, 5) > 0.4
    gathered = ops.gather_tokens(tokens, keep, mlp)
    torch.testing.assert_close(gathered, mlp(tokens) * keep[..., None], rtol=1e-6, atol=1e-6)
    assert torch.equal(gathered[~keep], torch.zeros_like(gathered[~keep]))


def test_flops_ratio_is_one_with_everything_on_and_matches_flop_counter_mode(tiny_dit, dit_inputs, make_dynamic,
                                                                             counted_attention, random_routers):  # fmt: skip
    plain = counted_attention(tiny_dit())
    dynamic = counted_attention(make_dynamic(plain, "dydit"))
    x, t, y = dit_inputs(plain, size=2)
    dynamic(x, t, y)
    assert torch.equal(dynamic.trunk.last.ratio, torch.ones(2))
    random_routers(dynamic, seed=1)
    for network in (dynamic, counted_attention(export(dynamic))):  # export builds fresh (fused) operators
        with FlopCounterMode(display=False) as counter:
            network(x, t, y)
        assert counter.get_total_flops() == int(dynamic_flops(network).sum())
    assert (dynamic_flops(dynamic) < plain_flops(dynamic)).all()


def test_the_width_table_is_batch_invariant(tiny_dit, make_dynamic, random_routers):
    dynamic = make_dynamic(tiny_dit(), "dydit")
    random_routers(dynamic, seed=2)
    steps = torch.arange(0, 1000, 37)
    table = dynamic.trunk.timestep_table(dynamic, steps)
    alone = torch.stack([dynamic.trunk.timestep_table(dynamic, steps[i : i + 1])[0] for i in range(len(steps))])
    assert torch.equal(table, alone)
    assert len(torch.unique(table.flatten(1), dim=0)) > 1  # the width does change with t
    exported = export(dynamic)
    assert torch.equal(exported.trunk.width_table[steps], table)


def test_a_group_count_that_does_not_divide_the_mlp_width_is_one_line(tiny_dit, make_dynamic):
    plain = tiny_dit()  # MLP width 128
    with pytest.raises(ValueError, match="groups=3 does not divide the MLP width 128"):
        make_dynamic(plain, "dydit", groups=3)
